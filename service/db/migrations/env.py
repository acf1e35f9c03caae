"""Alembic's environment for the job database's migrations.

They run on the connection that :mod:`service.db.schema` hands over in
``config.attributes["connection"]``, inside the transaction it holds (with the lock that
keeps other processes out, and its commit): no database URL and no ``alembic.ini`` are
read. Use :func:`service.db.schema.upgrade` or ``omnet db upgrade``.
"""

from __future__ import annotations

from alembic import context

from service.db.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError(
        "the job database's migrations run on a connection from service.db.schema "
        "(omnet db upgrade), not from an alembic.ini"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    # service.db.schema opens SQLite's transaction itself (BEGIN IMMEDIATE), so schema
    # changes there are transactional too.
    transactional_ddl=True if connection.dialect.name == "sqlite" else None,
)
with context.begin_transaction():
    context.run_migrations()
