"""``omnet db``: the job database's schema. ``omnet db upgrade`` migrates it to the newest
revision (API processes and workers also do that as they start); ``omnet db current``
shows its revision.

Both read the database from the settings (``OMNET_DATABASE_URL``, by default the SQLite
file in ``OMNET_STORAGE_DIR``), like ``omnet serve`` and ``omnet worker``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli.common import EXIT_FAILURE

NAME = "db"
HELP = "the job database's schema: migrate it to the newest, or show its revision"


def configure(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    upgrade = actions.add_parser(
        "upgrade",
        help="migrate the job database to the newest schema (API processes and workers "
        "also do it as they start)",
    )
    upgrade.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="each wait for the database gives up after this many seconds (default: "
        "OMNET_DATABASE_TIMEOUT_S); a migration of a large database may need more",
    )
    current = actions.add_parser("current", help="show the job database's schema revision")
    current.add_argument(
        "--check", action="store_true", help="exit with status 1 unless it is the newest"
    )


def run(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from service.config import get_settings
    from service.db import make_engine, migrate, schema

    settings = get_settings()
    url = sa.engine.make_url(settings.database)
    shown = url.render_as_string(hide_password=True)
    on_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    sqlite_file = Path(url.database) if on_file and url.database else None
    if args.action == "current" and sqlite_file is not None and not sqlite_file.exists():
        print(f"{shown}: no database yet (omnet db upgrade, or the first API or worker, makes it)")
        return EXIT_FAILURE if args.check else 0
    if args.action == "upgrade" and sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)

    timeout_s = getattr(args, "timeout_s", None)
    if timeout_s is None:
        timeout_s = settings.database_timeout_s
    engine = make_engine(settings.database, timeout_s)
    try:
        if args.action == "upgrade":
            done = migrate(engine)
            if not done.changed:
                print(f"{shown}: already at {done.after}, the newest schema")
            else:
                was = "created before migrations" if done.stamped else done.before or "empty"
                print(f"{shown}: migrated to {done.after} (was {was})")
            return 0
        head = schema.head()
        with engine.connect() as conn:
            revision = schema.current_revision(conn)
            earlier = revision is None and schema.predates_migrations(conn)
        if revision == head:
            state = f"{revision}, the newest"
        elif earlier:
            state = "none: created before migrations (omnet db upgrade migrates it)"
        elif revision is None:
            state = "none: empty (omnet db upgrade, or the first API or worker, makes the tables)"
        elif schema.known(revision):
            state = f"{revision}; the newest is {head} (omnet db upgrade migrates it)"
        else:
            state = f"{revision}, unknown to this version of omnet (its newest is {head})"
        print(f"{shown}: {state}")
        return EXIT_FAILURE if args.check and revision != head else 0
    finally:
        engine.dispose()
