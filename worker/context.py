"""What the tasks of one worker process share, kept on its Celery application.

:func:`worker.app.create_worker_app` puts a :class:`WorkerContext` on the application it
builds; the tasks and signal handlers of :mod:`worker.tasks` read it back with
:func:`context`. Both modules import this one and neither imports the other at import
time, so imports among the worker's modules run one way.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from service.config import Settings
from service.db import JobStore
from service.storage import Storage


@dataclass(frozen=True)
class WorkerContext:
    """What the tasks of one worker process share: its settings, job store and storage."""

    settings: Settings
    store: JobStore
    storage: Storage


def attach(app: Celery, ctx: WorkerContext) -> None:
    """Keeps ``ctx`` on ``app`` (at ``app.omnet``) for the tasks to find."""
    app.omnet = ctx  # type: ignore[attr-defined]


def context(app: Celery) -> WorkerContext:
    """The :class:`WorkerContext` of a worker application."""
    ctx: WorkerContext = app.omnet  # type: ignore[attr-defined]
    return ctx
