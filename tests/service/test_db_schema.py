"""Processes that start together on a new job database all get its tables.

``omnet serve`` and its worker, or several API processes, open a new database at the
same moment; creating the tables must not fail for the ones that lose the race."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest

from service.db import JobStore

PROCESSES = 6
ROUNDS = 4


def _open(url: str, barrier: multiprocessing.synchronize.Barrier, errors) -> None:
    barrier.wait(timeout=60)
    try:
        store = JobStore(url)
        store.engine.dispose()
    except Exception as exc:  # reported to the parent, which fails the test
        errors.put(f"{type(exc).__name__}: {exc}")


def _race(url: str) -> list[str]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    errors = context.Queue()
    procs = [context.Process(target=_open, args=(url, barrier, errors)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return found


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_processes_opening_a_new_sqlite_database_together_all_succeed(tmp_path, round_):
    url = f"sqlite:///{tmp_path / f'jobs-{uuid.uuid4().hex}.sqlite'}"
    assert _race(url) == []
    JobStore(url).create("alice", {}, {}, "omnet.cpu")  # the tables are there and usable


def test_processes_opening_a_new_database_together_all_succeed(database_url):
    assert _race(database_url) == []
