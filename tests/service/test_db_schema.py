"""Processes that start together on a job database all get its tables at the newest
schema.

``omnet serve`` and its worker, or several API processes, open a new database, or one
that an earlier release created, at the same moment; creating or migrating the tables
must not fail for the ones that lose the race."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
import sqlalchemy as sa

from service.db import JobStore, make_engine, utcnow
from service.db import schema as db_schema
from service.db.migrations.versions import v0001_baseline as baseline

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


def test_processes_opening_a_database_of_the_earlier_code_together_all_succeed(database_url):
    engine = make_engine(database_url)
    baseline.metadata.create_all(engine)  # as the code before migrations left it
    with engine.begin() as conn:
        conn.execute(
            baseline.workers.insert().values(
                name="w", device="cpu", queue="q", model="{}", started_at=utcnow(), seen_at=utcnow()
            )
        )
    engine.dispose()
    assert _race(database_url) == []
    with engine.connect() as conn:
        assert db_schema.current_revision(conn) == db_schema.head()
        assert conn.execute(sa.text("SELECT name FROM workers")).scalars().all() == ["w"]
    engine.dispose()
