"""Creates the job database's tables (:mod:`service.db.tables`) when a process opens it."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.db.tables import metadata

#: Tries of :func:`create_schema` when another process creates the same tables meanwhile.
SCHEMA_TRIES = 5


def create_schema(engine: Engine) -> None:
    """Creates the missing tables. Processes that start together on a new database (the
    API and its embedded worker, several API processes) race between "is the table
    there?" and "create it": the loser's CREATE fails with "already exists", and it
    looks again, finding the winner's tables."""
    for attempt in range(SCHEMA_TRIES):
        try:
            metadata.create_all(engine)
            return
        except sa.exc.DBAPIError as exc:
            message = str(exc.orig).lower()
            if attempt == SCHEMA_TRIES - 1 or not ("exist" in message or "duplicate" in message):
                raise
            time.sleep(0.05 * (attempt + 1))
