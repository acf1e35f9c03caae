"""A job sent again goes before the jobs sent as new, on each transport; a dead worker's
jobs are released (queued again, or failed with worker_lost at their last attempt).

In process: the real transports (the embedded mode's folder, Redis) and the real job
databases (SQLite, PostgreSQL); test_backlog_recovery.py kills real processes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from kombu import Consumer, Message, Queue

from service.config import Settings
from service.db import JobState, JobStore
from service.queue import (
    FolderLedger,
    broker_folder,
    make_celery,
    send_job,
)
from service.recovery import WORKER_LOST, release_lost
from service.storage import Storage


def _taken(celery: Celery, queue: str, count: int) -> list[str]:
    """The job ids of the next ``count`` messages a consumer of ``queue`` takes."""
    with celery.connection_for_read() as conn:
        channel = conn.default_channel
        taken = []
        for _ in range(count):
            message = channel.basic_get(queue, no_ack=True)
            assert message is not None, f"only {taken} in {queue}"
            taken.append(str(message.headers["id"]))
        assert channel.basic_get(queue, no_ack=True) is None
        return taken


def test_the_folder_transport_serves_a_job_sent_again_first(tmp_path: Path) -> None:
    settings = Settings(storage_dir=tmp_path / "storage")
    celery = make_celery(settings, client=True)
    queue = settings.queue("cpu")
    for job_id, resent in (("new-1", False), ("new-2", False), ("again", True)):
        send_job(celery, job_id, queue, resent=resent)
    folder = broker_folder(settings) / "queue"
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 3 and names[0].startswith("0_"), names  # nothing half-written
    assert FolderLedger(broker_folder(settings)).held_job_ids([queue]) == {
        "new-1",
        "new-2",
        "again",
    }
    assert _taken(celery, queue, 3) == ["again", "new-1", "new-2"]


def test_the_folder_transport_serves_each_kind_in_the_order_sent(tmp_path: Path) -> None:
    # Many messages a millisecond: the order sent must not rest on the clock's resolution.
    settings = Settings(storage_dir=tmp_path / "storage")
    celery = make_celery(settings, client=True)
    queue = settings.queue("cpu")
    sent = [(f"job-{i:02d}", i % 10 == 3) for i in range(40)]
    for job_id, resent in sent:
        send_job(celery, job_id, queue, resent=resent)
    again = [job_id for job_id, resent in sent if resent]
    new = [job_id for job_id, resent in sent if not resent]
    assert _taken(celery, queue, len(sent)) == again + new


def test_redis_serves_a_job_sent_again_first(tmp_path: Path, redis_url: str) -> None:
    prefix = f"omnet-recovery-{uuid.uuid4().hex[:8]}"
    settings = Settings(storage_dir=tmp_path, broker_url=redis_url, queue_prefix=prefix)
    celery = make_celery(settings, client=True)
    cpu, gpu = settings.queue("cpu"), settings.queue("cuda")
    send_job(celery, "new-1", cpu)
    send_job(celery, "new-2", cpu)
    send_job(celery, "again", cpu, resent=True)
    assert _taken(celery, cpu, 3) == ["again", "new-1", "new-2"]

    # A GPU worker consumes both queues (BRPOP over both): a job sent again on either
    # comes before the new ones of both.
    send_job(celery, "new-gpu", gpu)
    send_job(celery, "new-cpu", cpu)
    send_job(celery, "again-cpu", cpu, resent=True)
    got: list[str] = []

    def take(message: Message) -> None:
        got.append(str(message.headers["id"]))
        message.ack()

    with (
        celery.connection_for_read() as conn,
        Consumer(conn, [Queue(gpu), Queue(cpu)], on_message=take, prefetch_count=1),
    ):
        while len(got) < 3:
            conn.drain_events(timeout=10)
    assert got[0] == "again-cpu" and sorted(got[1:]) == ["new-cpu", "new-gpu"], got


# --------------------------------------------------------------------------- records
@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    store = JobStore(database_url)
    yield store
    store.engine.dispose()


def _job(store: JobStore, queue: str = "q.cpu", **options: object) -> str:
    job, _ = store.create("alice", dict(options), {}, queue)
    return job.id


def test_release_queues_again_the_jobs_of_a_dead_worker(store: JobStore) -> None:
    dead = [_job(store), _job(store)]
    live, untouched = _job(store), _job(store)
    for job_id in dead:
        assert store.claim(job_id, "host:11", stale_after_s=60) is not None
    assert store.claim(live, "host:12", stale_after_s=60) is not None
    store.heartbeat(dead[0], "host:11", 0.4, "inference")

    # Only the named job, when one is named; only the dead worker's.
    [one] = store.release("host:11", dead[1])
    assert one.id == dead[1]
    released = store.release("host:11")
    assert [j.id for j in released] == [dead[0]]
    for job_id in dead:
        job = store.get(job_id)
        assert job is not None
        assert (job.state, job.attempts, job.progress, job.stage) == (
            JobState.QUEUED,
            1,
            0.0,
            None,
        )
        assert job.worker == "host:11"  # the last attempt's, for the record
        # Claimed again at once: no waiting for a stale heartbeat.
        claimed = store.claim(job_id, "host:13", stale_after_s=60)
        assert claimed is not None and claimed.attempts == 2
    assert store.release("host:11") == []
    assert store.get(live).state == JobState.RUNNING  # type: ignore[union-attr]
    assert store.get(untouched).state == JobState.QUEUED  # type: ignore[union-attr]


def test_release_lost_sends_again_or_fails_at_the_last_attempt(
    tmp_path: Path, store: JobStore, database_url: str
) -> None:
    settings = Settings(storage_dir=tmp_path / "storage", database_url=database_url)
    settings.storage_dir.mkdir(parents=True)
    storage = Storage(settings.storage_dir)
    celery = make_celery(settings, client=True)
    queue = settings.queue("cpu")
    url = "https://hooks.example.org/omnet"
    resumed, exhausted = _job(store, queue), _job(store, queue, callback_url=url)
    for _ in range(settings.max_attempts - 1):  # died in earlier attempts
        assert store.claim(exhausted, "host:1", stale_after_s=0) is not None
    assert store.claim(resumed, "host:2", stale_after_s=60) is not None
    assert store.claim(exhausted, "host:2", stale_after_s=0) is not None
    send_job(celery, "new", queue)

    released = release_lost(settings, store, storage, celery, "host:2")
    assert sorted(released) == sorted([resumed, exhausted])
    job = store.get(exhausted)
    assert job is not None
    assert (job.state, job.attempts, job.error_code) == (
        JobState.FAILED,
        settings.max_attempts,
        WORKER_LOST,
    )
    [event] = store.deliveries(exhausted)
    assert json.loads(event.body)["data"]["error"]["code"] == WORKER_LOST
    assert store.get(resumed).state == JobState.QUEUED  # type: ignore[union-attr]
    assert _taken(celery, queue, 2) == [resumed, "new"]
