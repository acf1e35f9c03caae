"""How the processes that run inference wait between PyTorch's parallel regions, and on
how many threads they run.

Inference on a CPU is many short forward passes (about 32 of 16 small patches for a
BraTS case). Between two of them PyTorch's OpenMP threads spin by default (libgomp:
300,000 spins, a few milliseconds) instead of sleeping. On a host whose cores other
processes also use - the API beside a worker, a second worker, a training run - a
spinning thread takes CPU time that the others need, and one that is descheduled
stalls the rest of its region: on a 2-core machine with two busy processes beside it,
``omnet segment`` took 87 s with the default and 26 s with passive waits (equal on a
quiet machine).

:func:`prefer_passive_waits` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment
already sets it (the user's value wins). The OpenMP runtime reads it once, when torch
loads it, so each process entry point calls it before anything imports torch:
:func:`service.cli.main` (``omnet``, including ``omnet segment``, ``omnet serve`` and
its embedded worker, and ``omnet worker``, whose Celery worker inherits it) and
``python -m worker`` (before its pool forks the children that run the jobs).

:func:`set_thread_count` sets the number of threads of those runtimes (a worker's
``OMNET_THREADS``): ``python -m worker`` calls it before torch loads, so the worker and
its pool's children run inference on that many threads. Several workers on one machine
share its cores; each with as many threads as there are cores, they oversubscribe them.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import MutableMapping

#: The OpenMP variable, read by the runtime (libgomp, Intel's libiomp) when it loads.
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
#: Idle OpenMP threads sleep at once rather than spinning.
DEFAULT_WAIT_POLICY = "PASSIVE"


#: The variables that set the threads of PyTorch's OpenMP and MKL runtimes (read when
#: they load; PyTorch sizes its intra-op pool from them).
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class LateWaitPolicyWarning(RuntimeWarning):
    """The wait policy was set after torch was imported: its OpenMP runtime has already
    read its settings, so the policy does not apply to this process."""


def prefer_passive_waits(environ: MutableMapping[str, str] | None = None) -> str:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set (and not empty).

    Args:
        environ: the environment to change; by default this process's (``os.environ``,
            which child processes inherit).

    Returns:
        The policy now in ``environ``: the user's own, or ``PASSIVE``.

    Warns:
        LateWaitPolicyWarning: when it sets the policy in this process's environment
            after torch was imported (too late: call it before anything imports torch).
    """
    env = os.environ if environ is None else environ
    policy = env.get(WAIT_POLICY_ENV, "")
    if policy:
        return policy
    env[WAIT_POLICY_ENV] = DEFAULT_WAIT_POLICY
    if environ is None and "torch" in sys.modules:
        warnings.warn(
            f"{WAIT_POLICY_ENV}={DEFAULT_WAIT_POLICY} was set after torch was imported; "
            "PyTorch's OpenMP threads keep spinning in this process (set it before "
            "importing torch)",
            LateWaitPolicyWarning,
            stacklevel=2,
        )
    return DEFAULT_WAIT_POLICY


def set_thread_count(threads: int | None, environ: MutableMapping[str, str] | None = None) -> None:
    """Sets :data:`THREAD_ENVS` to ``threads``, over what the environment says; with
    ``threads`` None, changes nothing (the environment's value, else PyTorch's default:
    one thread per core).

    In this process's own environment (``environ`` None) once torch is imported, its
    runtimes have read their variables already: this then also calls
    ``torch.set_num_threads``, which takes effect in this process (not in children it
    started before).
    """
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1; got {threads}")
    env = os.environ if environ is None else environ
    for name in THREAD_ENVS:
        env[name] = str(threads)
    if environ is None and "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
