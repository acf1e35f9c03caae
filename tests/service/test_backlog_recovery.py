"""A job whose worker dies while other jobs wait behind it runs before them (real processes).

One worker runs a job with BACKLOG jobs queued behind it, and the process running the job
is SIGKILLed: the pool child of a prefork worker on Redis, the embedded worker of
``omnet serve`` (no broker), and the solo worker that ``omnet serve`` runs on Redis. The
job goes back to the queue ahead of the backlog (docs/delivery-guarantees.md), so it must
succeed, once, before any job that was queued behind it starts.

Nothing here is timed against an idle machine: the order is read from the job records,
and every wait is a generous bound on a loaded one.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.service.support import (
    SLOW_JOB,
    Api,
    Phantom,
    Proc,
    Stack,
    base_env,
    children_of,
    redis_env,
    wait_until,
)
from tests.service.support import stack as make_stack

#: Jobs queued behind the one that is killed.
BACKLOG = 3
#: The killed job's worker: long enough a job to be killed in the middle, on one thread.
SLOW = {**SLOW_JOB, "OMP_NUM_THREADS": "1"}
#: Waits of a loaded 2-core machine: a worker starting (Python, PyTorch, the model), and
#: all the jobs of a test running one after the other.
START_S, ALL_JOBS_S = 120.0, 300.0


def _submit(api: Api, phantom: Phantom) -> str:
    response = api.client("alice").post(
        "/v1/jobs", files=phantom.files(), data={"preview": "false"}
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _running(s: Stack, job_id: str) -> Any:
    record = s.record(job_id)
    return record if record is not None and record.state == "running" else None


def _kill_with_backlog(
    s: Stack,
    api: Api,
    phantoms: tuple[Phantom, Phantom],
    process_of: Callable[[str], int],
) -> tuple[str, list[str]]:
    """Submits a job on the long phantom, then BACKLOG more on the small one while it runs;
    SIGKILLs the process running the first one (``process_of(record's worker name)`` gives
    its pid) once its inference is under way. Returns the killed job and the backlog."""
    long, phantom = phantoms
    first = _submit(api, long)
    wait_until(lambda: _running(s, first), START_S, "the first job to run", s, 0.05)
    backlog = [_submit(api, phantom) for _ in range(BACKLOG)]
    record = wait_until(
        lambda: (r := _running(s, first)) and r.stage == "inference" and r,
        START_S,
        "the first job's inference",
        s,
        0.02,
    )
    assert all(s.record(j).state == "queued" for j in backlog), "the backlog should wait"
    os.kill(process_of(record.worker), signal.SIGKILL)
    return first, backlog


def _check_order(s: Stack, procs: list[Proc], first: str, backlog: list[str]) -> None:
    """The killed job resumed before any backlog job started, and every job succeeded
    once."""
    client = s.apis[0].client("alice")
    for job_id in (first, *backlog):
        s.wait_state(client, job_id, ("succeeded",), timeout=ALL_JOBS_S)
    killed = s.record(first)
    assert killed is not None and killed.attempts == 2
    for job_id in backlog:
        record = s.record(job_id)
        assert record is not None and record.attempts == 1, record
        assert record.started_at is not None and killed.started_at is not None
        assert record.started_at >= killed.started_at, (
            f"backlog job {job_id} started at {record.started_at}, before the killed job "
            f"resumed at {killed.started_at}\n{s.tails()}"
        )
    logs = "".join(p.output() for p in procs)
    for job_id in (first, *backlog):
        assert logs.count(f"job {job_id}: succeeded") == 1, job_id


def _pid(worker: str) -> int:
    host, _, pid = worker.rpartition(":")
    assert host == socket.gethostname(), worker
    return int(pid)


def test_a_killed_pool_child_s_job_runs_before_the_backlog(
    tmp_path: Path,
    redis_url: str,
    tiny_checkpoint: Path,
    phantom: Phantom,
    long_phantom: Phantom,
) -> None:
    prefix = f"omnet-backlog-{uuid.uuid4().hex[:8]}"
    with make_stack("prefork", tmp_path, redis_env(redis_url, prefix, tiny_checkpoint)) as s:
        api = s.wait_api(s.start_api())
        worker = s.start_worker("prefork", pool="prefork", **SLOW)
        s.wait_worker(worker, START_S)

        def child(name: str) -> int:
            pid = _pid(name)
            assert pid in children_of(worker.pid), "the job should run in a pool child"
            return pid

        first, backlog = _kill_with_backlog(s, api, (long_phantom, phantom), child)
        _check_order(s, [worker], first, backlog)
        assert worker.alive()
        assert f"job {first}: its worker" in worker.output()  # sent again by the parent


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_a_killed_serve_worker_s_job_runs_before_the_backlog(
    tmp_path: Path,
    redis_url: str,
    tiny_checkpoint: Path,
    phantom: Phantom,
    long_phantom: Phantom,
    broker: str,
) -> None:
    """``omnet serve`` restarts its (solo) worker; the dead worker's job goes first."""
    if broker == "embedded":
        env = base_env(tiny_checkpoint, **SLOW)
    else:
        prefix = f"omnet-backlog-{uuid.uuid4().hex[:8]}"
        env = redis_env(redis_url, prefix, tiny_checkpoint, **SLOW)
    with make_stack(f"serve-{broker}", tmp_path, env) as s:
        api = s.wait_api(s.start_serve())
        serve = api.proc

        def worker(name: str) -> int:
            assert children_of(serve.pid) == [_pid(name)], "serve should run the job's worker"
            return _pid(name)

        first, backlog = _kill_with_backlog(s, api, (long_phantom, phantom), worker)
        _check_order(s, [serve], first, backlog)
        assert serve.alive()
        assert f"job {first}: its worker" in serve.output()  # sent again by serve
