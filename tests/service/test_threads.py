"""OMNET_THREADS: the number of threads a worker runs inference on, set before torch loads.

As in test_openmp.py, the effective value is read from the OpenMP runtime itself: with
``OMP_DISPLAY_ENV=VERBOSE`` libgomp prints ``OMP_NUM_THREADS`` when torch loads it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from service.config import Settings
from service.openmp import THREAD_ENVS, set_thread_count
from tests.service.support import PYTHON

NUM_THREADS = re.compile(r"OMP_NUM_THREADS = '(\d+)'")


def test_unset_changes_nothing():
    env = {"PATH": "/bin", "OMP_NUM_THREADS": "3"}
    set_thread_count(None, env)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "3"}


def test_the_setting_wins_over_the_environment():
    env = {"OMP_NUM_THREADS": "8"}
    set_thread_count(2, env)
    assert env == dict.fromkeys(THREAD_ENVS, "2")
    with pytest.raises(ValueError, match="at least 1"):
        set_thread_count(0, {})


def test_the_setting_is_checked(monkeypatch):
    monkeypatch.setenv("OMNET_THREADS", "2")
    assert Settings().threads == 2
    monkeypatch.delenv("OMNET_THREADS")
    assert Settings().threads is None
    monkeypatch.setenv("OMNET_THREADS", "0")
    with pytest.raises(ValueError, match="threads"):
        Settings()


def _worker_threads(tmp_path: Path, **extra: str) -> set[int]:
    """The OMP_NUM_THREADS that the OpenMP runtime of ``python -m worker --help`` (which
    builds the worker app, and so loads torch) reported; skips unless it is libgomp."""
    env = {
        k: v for k, v in os.environ.items() if k not in THREAD_ENVS and not k.startswith("OMNET_")
    }
    env.update(OMP_DISPLAY_ENV="VERBOSE", OMNET_STORAGE_DIR=str(tmp_path), **extra)
    done = subprocess.run(
        [PYTHON, "-m", "worker", "--help"], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = {int(n) for n in NUM_THREADS.findall(done.stderr)}
    if not found:
        pytest.skip(f"no OMP_NUM_THREADS in the OpenMP runtime's output:\n{done.stderr[-2000:]}")
    return found


def test_the_worker_sets_its_threads_before_torch_loads(tmp_path):
    assert _worker_threads(tmp_path, OMNET_THREADS="1") == {1}
    assert _worker_threads(tmp_path, OMNET_THREADS="1", OMP_NUM_THREADS="2") == {1}
    # Unset: the environment's own value stands.
    assert _worker_threads(tmp_path, OMP_NUM_THREADS="2") == {2}
