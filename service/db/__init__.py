"""Job records, worker registrations and deliveries (webhook events, DICOMweb stores),
shared by every API process and worker.

SQLAlchemy Core over SQLite by default (a file in the shared storage folder, WAL mode)
or any other database URL (PostgreSQL in a larger deployment). Every state change is
one conditional UPDATE, so several API processes and workers can share the records
without locks of their own.

The package's public names are imported from here; its modules:

- :mod:`~service.db.records`: the states and records (:class:`JobState`, :class:`Job`,
  :class:`Delivery`, ...);
- :mod:`~service.db.engine`: the connection, with its deadlines, and the fork gate;
- :mod:`~service.db.tables`: the tables; :mod:`~service.db.schema`: the migrations
  (:mod:`~service.db.migrations`) that bring a database to them;
- :mod:`~service.db.store`: :class:`JobStore`, with the outbox of deliveries
  (:mod:`~service.db.outbox`);
- :mod:`~service.db.rates`: the deployment's measured pace (:class:`Pace`) and the wait
  it predicts for a queued job.
"""

from __future__ import annotations

from service.db.engine import DATABASE_TIMEOUT_S, FORK_WAIT_S, Deadlines, ForkGate, make_engine
from service.db.rates import Pace
from service.db.records import (
    ACTIVE,
    FINISHED,
    AttemptResult,
    Delivery,
    DeliveryStatus,
    Job,
    JobState,
    NewDelivery,
    utcnow,
)
from service.db.schema import SCHEMA_TRIES, SchemaError, create_schema, migrate
from service.db.store import JobStore
from service.db.tables import deliveries, jobs, metadata, workers

__all__ = [
    "ACTIVE",
    "DATABASE_TIMEOUT_S",
    "FINISHED",
    "FORK_WAIT_S",
    "SCHEMA_TRIES",
    "AttemptResult",
    "Deadlines",
    "Delivery",
    "DeliveryStatus",
    "ForkGate",
    "Job",
    "JobState",
    "JobStore",
    "NewDelivery",
    "Pace",
    "SchemaError",
    "create_schema",
    "deliveries",
    "jobs",
    "make_engine",
    "metadata",
    "migrate",
    "utcnow",
    "workers",
]
