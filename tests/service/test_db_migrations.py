"""The job database's schema migrations (service/db/schema.py, service/db/migrations/).

Real databases: a SQLite file, and a database of its own on PostgreSQL where a server
answers (the ``database_url`` fixture). A database "of the earlier code" is made here as
that code made it: ``metadata.create_all`` of the baseline's tables, with rows in them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from service.db import (
    DeliveryStatus,
    JobState,
    JobStore,
    SchemaError,
    create_schema,
    make_engine,
    metadata,
    migrate,
)
from service.db import schema as db_schema
from service.db.migrations.versions import v0001_baseline as baseline

ROOT = Path(__file__).resolve().parents[2]
CREATED = datetime(2026, 1, 2, 3, 4, 5)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _earlier_database(engine: sa.Engine) -> None:
    """The schema and rows that the code before migrations left: a finished job with its
    result, its webhook delivery, and a worker."""
    baseline.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            baseline.jobs.insert().values(
                id="job-1",
                owner="alice",
                idempotency_key="key-1",
                state="succeeded",
                progress=1.0,
                options=json.dumps({"tta": True}),
                inputs=json.dumps({"t1": "t1.nii.gz"}),
                queue="omnet.cpu",
                created_at=CREATED,
                finished_at=CREATED,
                attempts=1,
                result=json.dumps({"volumes_ml": {"wt": 1.5}}),
            )
        )
        conn.execute(
            baseline.deliveries.insert().values(
                id="msg_1",
                job_id="job-1",
                owner="alice",
                event="job.succeeded",
                url="https://example.org/hook",
                body="{}",
                status="failed",
                attempts=3,
                created_at=CREATED,
            )
        )
        conn.execute(
            baseline.workers.insert().values(
                name="cpu0@host",
                device="cpu",
                queue="omnet.cpu",
                model="{}",
                started_at=CREATED,
                seen_at=CREATED,
            )
        )


def _revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return db_schema.current_revision(conn)


def _differences(engine: sa.Engine) -> list:
    """What tells the database's schema from the code's tables (indexes and constraints
    by name too); empty when they match."""
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_the_migrations_form_one_line_from_the_baseline():
    scripts = db_schema.scripts()
    assert scripts.get_heads() == [db_schema.head()]
    assert scripts.get_bases() == [db_schema.BASELINE] == [baseline.revision]


def test_an_empty_database_is_migrated_to_the_head(engine):
    migration = migrate(engine)
    assert (migration.before, migration.after, migration.stamped) == (None, db_schema.head(), False)
    assert _revision(engine) == db_schema.head()
    assert _differences(engine) == []
    assert "webhook_deliveries" not in sa.inspect(engine).get_table_names()


def test_a_database_of_the_earlier_code_keeps_its_rows(engine, database_url):
    _earlier_database(engine)
    assert _revision(engine) is None
    with engine.connect() as conn:
        assert db_schema.predates_migrations(conn)

    migration = migrate(engine)
    assert (migration.before, migration.stamped, migration.after) == (None, True, db_schema.head())
    assert _revision(engine) == db_schema.head()
    assert _differences(engine) == []
    assert "webhook_deliveries" not in sa.inspect(engine).get_table_names()

    store = JobStore(database_url)
    try:
        job = store.get("job-1", "alice")
        assert job is not None
        assert (job.state, job.created_at) == (JobState.SUCCEEDED, CREATED)
        assert job.options == {"tta": True}
        assert job.result == {"volumes_ml": {"wt": 1.5}}
        assert store.by_idempotency_key("alice", "key-1") == job
        [delivery] = store.deliveries("job-1")
        assert (delivery.id, delivery.status) == ("msg_1", DeliveryStatus.FAILED)
        assert delivery.attempts == 3
        assert store.retry_deliveries("job-1", "job.") == 1  # the renamed table takes writes
        assert [w["name"] for w in store.live_workers(within_s=1e9)] == ["cpu0@host"]
        new, created = store.create("alice", {}, {}, "omnet.cpu", idempotency_key="key-1")
        assert (new.id, created) == ("job-1", False)  # the unique constraint survived
    finally:
        store.engine.dispose()


def test_jobs_of_revision_0002_have_no_submission_fingerprint_and_keep_it_both_ways(
    engine, database_url
):
    """0003 adds jobs.submission_sha256: the jobs already there get none (NULL), a new
    job records its own, and going back to 0002 drops the column and keeps the rows."""
    _earlier_database(engine)
    with engine.begin() as conn:
        command.stamp(db_schema.alembic_config(conn), db_schema.BASELINE)
        command.upgrade(db_schema.alembic_config(conn), "0002_deliveries_table")
    assert "submission_sha256" not in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    assert migrate(engine).before == "0002_deliveries_table"
    store = JobStore(database_url)
    try:
        old = store.get("job-1")
        assert old is not None and old.submission_sha256 is None
        assert old.idempotency_key == "key-1" and old.result == {"volumes_ml": {"wt": 1.5}}
        new, created = store.create("alice", {}, {}, "omnet.cpu", "key-2", None, "ab" * 32)
        assert created and store.get(new.id) == new and new.submission_sha256 == "ab" * 32
    finally:
        store.engine.dispose()
    with engine.begin() as conn:
        command.downgrade(db_schema.alembic_config(conn), "0002_deliveries_table")
    assert "submission_sha256" not in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, idempotency_key FROM jobs ORDER BY id")).all()
    assert sorted(tuple(r) for r in rows) == sorted([("job-1", "key-1"), (new.id, "key-2")])
    migrate(engine)
    assert _differences(engine) == []


def test_a_database_of_the_earlier_code_missing_a_table_gets_it(engine):
    """The earlier code created the tables one by one; a start cut short left some out,
    and the next start created them."""
    baseline.jobs.create(engine)
    assert migrate(engine).stamped
    assert _differences(engine) == []


def test_migrating_again_changes_nothing_and_takes_no_lock(engine):
    first = migrate(engine)
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        again = migrate(engine)
        create_schema(engine)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert first.changed and not again.changed
    assert (again.before, again.after) == (db_schema.head(), db_schema.head())
    writes = [s for s in statements if not s.lstrip().upper().startswith(("SELECT", "PRAGMA"))]
    assert writes == []


def test_a_revision_this_code_does_not_know_is_refused(engine):
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    with pytest.raises(SchemaError, match="9999_from_the_future"):
        migrate(engine)
    assert _revision(engine) == "9999_from_the_future"


def test_the_migrations_go_back_to_the_baseline_and_forward_again(engine):
    _earlier_database(engine)
    migrate(engine)
    with engine.begin() as conn:
        command.downgrade(db_schema.alembic_config(conn), db_schema.BASELINE)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), baseline.metadata)
    assert diffs == []  # the baseline's schema, names and all
    assert _revision(engine) == db_schema.BASELINE
    migrate(engine)
    assert _differences(engine) == []
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM deliveries")).scalar_one() == 1


@pytest.mark.parametrize("earlier", [False, True], ids=["empty", "earlier"])
def test_a_failed_migration_changes_nothing(engine, monkeypatch, earlier):
    """Schema changes run in the migration's transaction, on SQLite too."""
    if earlier:
        _earlier_database(engine)
    before = set(sa.inspect(engine).get_table_names())
    real_upgrade = command.upgrade

    def upgrade_then_fail(config, revision) -> None:
        real_upgrade(config, revision)
        raise RuntimeError("cut short")

    monkeypatch.setattr(command, "upgrade", upgrade_then_fail)
    with pytest.raises(RuntimeError, match="cut short"):
        migrate(engine)
    assert set(sa.inspect(engine).get_table_names()) == before  # no revision, no rename
    assert _revision(engine) is None
    monkeypatch.undo()
    assert migrate(engine).stamped == earlier
    assert _differences(engine) == []


def test_threads_opening_a_database_together_all_succeed(database_url, engine):
    _earlier_database(engine)
    barrier = threading.Barrier(6)
    errors: list[str] = []

    def open_store() -> None:
        barrier.wait(timeout=60)
        try:
            JobStore(database_url).engine.dispose()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert _revision(engine) == db_schema.head()
    assert _differences(engine) == []


def test_the_migrations_are_installed_with_the_package():
    """setuptools installs packages only: each folder of migrations is one."""
    code = (
        "import setuptools, json; print(json.dumps(setuptools.find_packages("
        "include=['model*', 'service*', 'worker*'])))"
    )
    found = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout
    )
    assert {"service.db", "service.db.migrations", "service.db.migrations.versions"} <= set(found)
    versions = {p.name for p in db_schema.MIGRATIONS.joinpath("versions").glob("v*.py")}
    assert {Path(s.path).name for s in db_schema.scripts().walk_revisions()} == versions


@pytest.fixture
def omnet_db(database_url, monkeypatch, capsys):
    """Runs ``omnet db ...`` on the test's database; returns (exit status, stdout)."""
    from service.cli import main
    from service.config import get_settings

    monkeypatch.setenv("OMNET_DATABASE_URL", database_url)
    get_settings.cache_clear()

    def run(*argv: str) -> tuple[int, str]:
        code = main(["db", *argv])
        return code, capsys.readouterr().out

    yield run
    get_settings.cache_clear()


def test_omnet_db_shows_and_migrates_a_database_of_the_earlier_code(engine, omnet_db):
    code, out = omnet_db("current", "--check")
    assert code == 1 and ("none: empty" in out or "no database yet" in out)  # SQLite: no file
    _earlier_database(engine)
    code, out = omnet_db("current", "--check")
    assert code == 1 and "created before migrations" in out

    code, out = omnet_db("upgrade")
    assert code == 0
    assert f"migrated to {db_schema.head()} (was created before migrations)" in out
    code, out = omnet_db("upgrade")
    assert code == 0 and f"already at {db_schema.head()}" in out
    code, out = omnet_db("current", "--check")
    assert code == 0 and f"{db_schema.head()}, the newest" in out
