"""The job store (service/db/) across os.fork: a Celery prefork parent uses the job store from its
threads while it forks pool children, and a child must be able to claim jobs at once.

Real databases (a SQLite file, and PostgreSQL where a server answers) and real forked
processes; each child reports through its exit status.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from service.db import JobState, JobStore

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    store = JobStore(database_url)
    yield store
    store.engine.dispose()


def _new_job(store: JobStore) -> str:
    job, _ = store.create("alice", {}, {"t1": "t1.nii.gz"}, queue="omnet.cpu")
    return job.id


def _in_child(work) -> int:
    """Forks; the child runs ``work`` (exit status 0 when it returns True, 1 when it
    returns False, 2 when it raises); returns the child's exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (runs in the child)
        try:
            code = 0 if work() else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_child_starts_with_none_of_the_parents_connections(store):
    job_id = _new_job(store)
    assert store.get(job_id) is not None
    assert store.engine.pool.checkedin() == 1  # an idle pooled connection in the parent

    def child() -> bool:
        fresh = store.engine.pool.checkedin() == 0
        claimed = store.claim(job_id, "child", stale_after_s=60)
        return fresh and claimed is not None and claimed.state == JobState.RUNNING

    assert _in_child(child) == 0
    assert store.engine.pool.checkedin() == 0  # the parent's idle one was closed, not copied
    record = store.get(job_id)
    assert record is not None and record.worker == "child"


def test_a_fork_waits_until_no_connection_is_in_use(store):
    held_s = 0.5
    inside, release = threading.Event(), threading.Event()

    def reader() -> None:
        with store._read() as conn:
            inside.set()
            release.wait(5)
            conn.exec_driver_sql("SELECT 1")

    thread = threading.Thread(target=reader)
    thread.start()
    assert inside.wait(5)
    threading.Timer(held_s, release.set).start()
    started = time.monotonic()
    assert _in_child(lambda: True) == 0
    waited = time.monotonic() - started
    thread.join(5)
    assert waited >= held_s * 0.8, f"the fork went ahead after {waited:.2f} s"


def test_children_forked_while_parent_threads_write_can_all_claim(store):
    """What a prefork worker does: its heartbeat thread writes all the time while pool
    children are forked, and each child claims and updates a job straight away."""
    stop = threading.Event()
    writes = 0

    def heartbeat() -> None:
        nonlocal writes
        store.register_worker("parent", "cpu", "omnet.cpu", {})
        while not stop.is_set():
            store.worker_seen("parent")
            writes += 1

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        for n in range(12):
            job_id = _new_job(store)

            def child(job_id: str = job_id, n: int = n) -> bool:
                claimed = store.claim(job_id, f"child-{n}", stale_after_s=60)
                beat = store.heartbeat(job_id, f"child-{n}", 0.5, "inference")
                return claimed is not None and beat is not None and beat.progress == 0.5

            started = time.monotonic()
            assert _in_child(child) == 0, f"child {n} could not claim its job"
            assert time.monotonic() - started < 10
    finally:
        stop.set()
        thread.join(10)
    assert writes > 12  # the parent did write between and during the forks
    assert store.counts()[JobState.RUNNING] == 12
