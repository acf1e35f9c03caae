"""The worker's Celery application: the shared factory plus the worker's context.

:func:`create_worker_app` builds everything a worker process needs from its settings,
once; nothing happens at import time. ``python -m worker`` (what ``omnet worker``
runs) calls it and starts Celery's worker on the result.

Imports run one way: this module and :mod:`worker.tasks` both read the shared state
from :mod:`worker.context`, and the tasks never import this module.
"""

from __future__ import annotations

from celery import Celery

from service.config import Settings
from service.db import JobStore
from service.queue import make_celery
from service.storage import Storage
from worker.context import WorkerContext, attach

#: The modules holding the worker's tasks and signal handlers.
TASK_MODULES = ("worker.tasks",)


def create_worker_app(settings: Settings) -> Celery:
    """The Celery application of a worker, with :data:`TASK_MODULES` registered and a
    :class:`~worker.context.WorkerContext` at ``app.omnet``."""
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    app = make_celery(settings, include=list(TASK_MODULES))
    store = JobStore(settings.database, settings.database_timeout_s)
    attach(app, WorkerContext(settings, store, Storage(settings.storage_dir)))
    # Imported here too, not only when Celery's worker starts (``include``): the
    # application comes back with its tasks and signal handlers registered. Not at the
    # top of this module: the tasks load torch, which ``python -m worker`` must not do
    # before it has set the OpenMP wait policy.
    import worker.tasks  # noqa: F401

    return app
