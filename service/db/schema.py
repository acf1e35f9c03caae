"""Brings a job database's schema to the newest migration.

The migrations are Alembic revisions kept in the package (:mod:`service.db.migrations`).
Every API process and worker calls :func:`create_schema` when it opens the database, and
``omnet db upgrade`` calls :func:`migrate`. Either reads the database's revision, and:

- at the newest revision (the head): does nothing more (one read, no lock);
- no revision and none of the tables (an empty database): runs every migration;
- no revision but the tables of the baseline (a database that the code before
  migrations created): creates any baseline table still missing, as that code did,
  records the baseline revision, then runs the migrations after it;
- a revision this code does not know (a newer release migrated the database): raises
  :class:`SchemaError`, changing nothing.

Processes that open one database together (the API and its embedded worker, several API
processes and workers) migrate it one at a time: each takes a lock held until the
migration's transaction ends (PostgreSQL: a transaction-level advisory lock; SQLite:
``BEGIN IMMEDIATE``, the database's write lock), reads the revision again under it, and
finds the work done when another process did it meanwhile. Both run schema changes in
the transaction, so a migration that fails changes nothing. The wait for the lock is
bounded by the engine's deadlines (``OMNET_DATABASE_TIMEOUT_S``). On another kind of
database, a process that loses the race fails with "already exists" and tries again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from types import ModuleType

    from alembic.config import Config
    from alembic.script import ScriptDirectory

logger = logging.getLogger(__name__)

#: Alembic's script folder (``env.py``, ``versions/``), inside the package.
MIGRATIONS = Path(__file__).resolve().with_name("migrations")
#: The first revision: the schema as the code before migrations created it.
BASELINE = "0001_baseline"
#: Alembic's table of the database's revision.
VERSION_TABLE = "alembic_version"
#: Tries of :func:`create_schema` when another process creates the same tables meanwhile.
SCHEMA_TRIES = 5
#: Key of the PostgreSQL advisory lock held while migrating (advisory locks belong to one
#: database, so databases on one server do not wait for each other).
ADVISORY_LOCK = 0x6F6D6E6574  # "omnet"

# Alembic's ``op`` and ``context`` are process-wide: threads migrate one at a time.
_migrating = threading.Lock()


def _fresh_lock_after_fork() -> None:
    global _migrating
    _migrating = threading.Lock()  # the parent's copy may be held by a thread now gone


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


class SchemaError(RuntimeError):
    """The database is at a revision that this code cannot migrate from."""


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate` found and left."""

    #: The revision found; None for an empty database, or one created before migrations.
    before: str | None
    #: The revision now: the head.
    after: str
    #: The database was created before migrations and was recorded at the baseline.
    stamped: bool = False

    @property
    def changed(self) -> bool:
        return self.stamped or self.before != self.after


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the package's migrations, made in code (no
    ``alembic.ini``); with ``connection``, the migrations run on it (``migrations/env.py``)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection  # read by migrations/env.py
    return config


def _baseline() -> ModuleType:
    """The baseline revision's module, with the schema the code before migrations created
    (imported on first use: Alembic loads with it)."""
    from service.db.migrations.versions import v0001_baseline

    return v0001_baseline


@cache
def scripts() -> ScriptDirectory:
    """The migrations shipped with the package."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision: the schema that :mod:`service.db.tables` describes."""
    found = scripts().get_current_head()
    if found is None:  # pragma: no cover - the package ships its migrations
        raise SchemaError(f"no migrations in {MIGRATIONS}")
    return found


def current_revision(conn: Connection) -> str | None:
    """The database's revision, read from Alembic's table; None when it has none (an empty
    database, or one created before migrations: see :func:`predates_migrations`)."""
    if not sa.inspect(conn).has_table(VERSION_TABLE):
        return None
    found = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(found) > 1:
        raise SchemaError(f"the job database records several schema revisions: {found}")
    return found[0] if found else None


def _has_baseline_tables(conn: Connection) -> bool:
    return bool(set(sa.inspect(conn).get_table_names()) & set(_baseline().metadata.tables))


def predates_migrations(conn: Connection) -> bool:
    """Whether the database holds tables of the baseline but no revision: the code before
    migrations created it."""
    return current_revision(conn) is None and _has_baseline_tables(conn)


def known(revision: str) -> bool:
    """Whether ``revision`` is one of the package's migrations."""
    from alembic.util import CommandError

    try:
        return scripts().get_revision(revision) is not None
    except CommandError:
        return False


def _lock(conn: Connection) -> None:
    """Begins the migration's transaction, holding the lock that keeps other processes'
    migrations out until it ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK})
    elif conn.dialect.name == "sqlite":
        # The driver leaves schema statements outside transactions unless one is open.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine) -> Migration:
    """Brings the database to the head revision (see the module's docstring)."""
    from alembic import command

    target = head()
    with engine.connect() as conn:
        found = current_revision(conn)
        conn.rollback()
        if found == target:
            return Migration(found, target)
        with _migrating:
            _lock(conn)
            found = current_revision(conn)  # another process may have migrated meanwhile
            if found is not None and not known(found):
                raise SchemaError(
                    f"the job database is at schema revision {found!r}, which this version "
                    f"of omnet does not know (its newest is {target!r}): a newer release "
                    "migrated it; run that release"
                )
            stamped = found is None and _has_baseline_tables(conn)
            if stamped:
                _baseline().metadata.create_all(conn)  # only the tables that are missing
                command.stamp(alembic_config(conn), BASELINE)
            if (BASELINE if stamped else found) != target:
                command.upgrade(alembic_config(conn), target)
            conn.commit()
    migration = Migration(found, target, stamped)
    if migration.changed:
        logger.info(
            "job database schema: %s -> %s",
            "created before migrations" if stamped else found or "empty",
            target,
        )
    return migration


def create_schema(engine: Engine) -> None:
    """Brings the database to the newest schema with :func:`migrate`. Where no lock keeps
    processes that start together apart (a database other than PostgreSQL and SQLite),
    the one that loses the race between "is the table there?" and "create it" fails
    with "already exists", and tries again, finding the winner's tables."""
    for attempt in range(SCHEMA_TRIES):
        try:
            migrate(engine)
            return
        except sa.exc.DBAPIError as exc:
            message = str(exc.orig).lower()
            if attempt == SCHEMA_TRIES - 1 or not ("exist" in message or "duplicate" in message):
                raise
            time.sleep(0.05 * (attempt + 1))
