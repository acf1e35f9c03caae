"""The time left of queued jobs (``eta_s``), from the deployment's measured pace.

:class:`service.db.rates.Pace` is checked on its own; :meth:`JobStore.pace` and the job
routes run on each job database (SQLite and PostgreSQL, the ``database_url`` fixture),
on jobs whose start and finish times are written into their records.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.db import JobState, JobStore, Pace, jobs, utcnow, workers
from service.db.rates import RECENT_RUNS
from tests.service.support import open_app, store_of

RETENTION = timedelta(hours=1)


# --------------------------------------------------------------------------- the estimate
def test_no_estimate_without_a_measured_run_or_a_worker():
    assert Pace((), (), 2).eta_s(1) is None  # nothing has succeeded yet
    assert Pace((), ((5.0, 0.5),), 1).eta_s(1) is None
    assert Pace((30.0,), (), 0).eta_s(1) is None  # nothing would run it
    assert Pace((30.0,), (), 1).eta_s(0) is None


def test_idle_workers_take_the_queue_in_turns():
    pace = Pace((10.0, 20.0, 90.0), (), 2)  # median 20 s
    assert pace.run_time_s == 20.0
    # (floor((position - 1) / workers) + 1) x median
    assert [pace.eta_s(p) for p in range(1, 6)] == [20.0, 20.0, 40.0, 40.0, 60.0]
    assert Pace((20.0,), (), 1).eta_s(3) == 60.0


def test_busy_workers_free_as_their_jobs_finish():
    # One worker, its job 5 s into a 20 s median and without a rate of its own yet.
    pace = Pace((20.0,), ((5.0, 0.05),), 1)
    assert pace.eta_s(1) == 35.0
    assert pace.eta_s(2) == 55.0
    # With its own rate (a quarter done in 30 s), the running job has 90 s left.
    assert Pace((20.0,), ((30.0, 0.25),), 1).eta_s(1) == 110.0
    # Overdue by the median: free at once.
    assert Pace((20.0,), ((50.0, 0.0),), 1).eta_s(1) == 20.0
    # Two workers, one busy for 15 s more: the first queued job goes to the idle one.
    two = Pace((20.0,), ((5.0, 0.0),), 2)
    assert [two.eta_s(p) for p in (1, 2, 3)] == [20.0, 35.0, 40.0]


def test_more_running_jobs_than_workers_count_as_slots():
    # A prefork worker registers once and runs several jobs at a time.
    pace = Pace((20.0,), ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0)), 1)
    assert pace.slots == 3
    assert [pace.eta_s(p) for p in (1, 3, 4)] == [40.0, 40.0, 60.0]


# --------------------------------------------------------------------------- the store
def _set(store: JobStore, job_id: str, **values: object) -> None:
    with store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))


def _succeeded(store: JobStore, run_s: float, finished_at: datetime) -> str:
    """A job that ran ``run_s`` seconds and succeeded at ``finished_at``."""
    job, _ = store.create("anonymous", {}, {}, "omnet.cpu")
    assert store.claim(job.id, "w:1", 60) is not None
    assert store.finish(job.id, "w:1", JobState.SUCCEEDED, RETENTION)
    _set(store, job.id, started_at=finished_at - timedelta(seconds=run_s), finished_at=finished_at)
    return job.id


def _running(store: JobStore, elapsed_s: float, heartbeat_age_s: float = 0.0) -> str:
    job, _ = store.create("anonymous", {}, {}, "omnet.cpu")
    assert store.claim(job.id, "w:2", 60) is not None
    now = utcnow()
    _set(
        store,
        job.id,
        started_at=now - timedelta(seconds=elapsed_s),
        heartbeat_at=now - timedelta(seconds=heartbeat_age_s),
    )
    return job.id


def _worker(store: JobStore, name: str, seen_ago_s: float = 0.0) -> None:
    store.register_worker(name, "cpu", "omnet.cpu", {})
    with store.engine.begin() as conn:
        conn.execute(
            workers.update()
            .where(workers.c.name == name)
            .values(seen_at=utcnow() - timedelta(seconds=seen_ago_s))
        )


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    store = JobStore(database_url)
    yield store
    store.engine.dispose()


def test_the_pace_of_an_empty_store(store):
    pace = store.pace(30, 120)
    assert pace == Pace((), (), 0)
    assert pace.run_time_s is None and pace.eta_s(1) is None


def test_the_pace_reads_recent_runs_live_jobs_and_live_workers(store):
    now = utcnow()
    # Older runs of 1000 s, then RECENT_RUNS of 12 s: only the latest count.
    for i in range(5):
        _succeeded(store, 1000.0, now - timedelta(hours=2, minutes=i))
    for i in range(RECENT_RUNS):
        _succeeded(store, 12.0, now - timedelta(minutes=i))
    failed, _ = store.create("anonymous", {}, {}, "omnet.cpu")  # a failure is no run time
    store.claim(failed.id, "w:1", 60)
    store.finish(failed.id, "w:1", JobState.FAILED, RETENTION)
    _set(store, failed.id, started_at=now - timedelta(seconds=5000), finished_at=now)
    _running(store, 4.0)
    _running(store, 500.0, heartbeat_age_s=600.0)  # its worker went silent: not counted
    store.create("anonymous", {}, {}, "omnet.cpu")  # queued
    _worker(store, "host:1")
    _worker(store, "host:2", seen_ago_s=5.0)
    _worker(store, "host:3", seen_ago_s=300.0)  # gone

    pace = store.pace(30, 120)
    assert pace.run_times_s == pytest.approx([12.0] * RECENT_RUNS)
    assert pace.run_time_s == pytest.approx(12.0)
    assert pace.workers == 2
    assert len(pace.running) == 1
    elapsed, progress = pace.running[0]
    assert elapsed == pytest.approx(4.0, abs=2.0) and progress == 0.0


# --------------------------------------------------------------------------- the routes
@pytest.fixture
def client(tmp_path: Path, database_url: str) -> Iterator[TestClient]:
    with open_app(tmp_path / "storage", database_url) as client:
        yield client


def _store(client: TestClient) -> JobStore:
    return store_of(client)


def _queued(store: JobStore, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        job, _ = store.create("anonymous", {}, {}, "omnet.cpu")
        ids.append(job.id)
    return ids


def _status(client: TestClient, job_id: str) -> dict:
    answer = client.get(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_queued_jobs_have_no_estimate_without_history(client):
    store = _store(client)
    _worker(store, "host:1")
    _running(store, 3.0)
    queued = _queued(store, 2)
    for position, job_id in enumerate(queued, 1):
        status = _status(client, job_id)
        assert (status["queue_position"], status["eta_s"]) == (position, None)
    page = client.get("/v1/jobs").json()["items"]
    assert [item["eta_s"] for item in page if item["state"] == "queued"] == [None, None]


def test_queued_jobs_have_no_estimate_without_a_live_worker(client):
    store = _store(client)
    _succeeded(store, 20.0, utcnow())
    _worker(store, "host:1", seen_ago_s=600.0)
    (job_id,) = _queued(store, 1)
    assert _status(client, job_id)["eta_s"] is None


def test_queued_jobs_wait_for_the_running_one_then_take_the_median_each(client):
    store = _store(client)
    now = utcnow()
    for i, run_s in enumerate((10.0, 20.0, 30.0)):  # median 20 s
        _succeeded(store, run_s, now - timedelta(minutes=i))
    _worker(store, "host:1")
    _running(store, 5.0)  # no rate of its own yet: about 15 s left
    first, second = _queued(store, 2)
    assert _status(client, first)["eta_s"] == pytest.approx(35.0, abs=2.0)
    assert _status(client, second)["eta_s"] == pytest.approx(55.0, abs=2.0)
    # The list says the same.
    page = {item["id"]: item for item in client.get("/v1/jobs").json()["items"]}
    assert page[first]["eta_s"] == pytest.approx(35.0, abs=2.0)
    assert page[second]["eta_s"] == pytest.approx(55.0, abs=2.0)
    # A second worker takes the first queued job at once.
    _worker(store, "host:2")
    assert _status(client, first)["eta_s"] == pytest.approx(20.0)
    assert _status(client, second)["eta_s"] == pytest.approx(35.0, abs=2.0)


def test_running_and_finished_jobs_keep_their_own_estimate(client):
    store = _store(client)
    done = _succeeded(store, 20.0, utcnow())
    _worker(store, "host:1")
    running = _running(store, 30.0)
    assert _status(client, running)["eta_s"] is None  # no progress of its own yet
    store.heartbeat(running, "w:2", 0.25, "inference")
    assert _status(client, running)["eta_s"] == pytest.approx(90.0, abs=3.0)
    assert _status(client, done)["eta_s"] is None
