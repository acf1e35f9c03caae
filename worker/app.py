"""The worker's Celery application: the shared factory plus the worker's tasks and state.

:func:`create_worker_app` builds everything a worker process needs from its settings,
once; nothing happens at import time. ``python -m worker`` (what ``omnet worker``
runs) calls it and starts Celery's worker on the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from service.config import Settings
from service.db import JobStore
from service.queue import make_celery
from service.storage import Storage


@dataclass(frozen=True)
class WorkerContext:
    """What the tasks of one worker process share: its settings, job store and storage."""

    settings: Settings
    store: JobStore
    storage: Storage


def create_worker_app(settings: Settings) -> Celery:
    """The Celery application of a worker, with :mod:`worker.tasks` registered and a
    :class:`WorkerContext` at ``app.omnet``."""
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    app = make_celery(settings, include=["worker.tasks"])
    store = JobStore(settings.database, settings.database_timeout_s)
    app.omnet = WorkerContext(  # type: ignore[attr-defined]
        settings, store, Storage(settings.storage_dir)
    )
    import worker.tasks  # noqa: F401  (registers the tasks and signal handlers)

    return app


def context(app: Celery) -> WorkerContext:
    """The :class:`WorkerContext` of a worker application."""
    ctx: WorkerContext = app.omnet  # type: ignore[attr-defined]
    return ctx
