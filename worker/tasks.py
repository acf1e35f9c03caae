"""Celery tasks: thin wrappers that hand a job id to :mod:`worker.runner`.

The task is a shared task, bound to the application that :func:`worker.app.create_worker_app`
builds; it and the signal handlers find the worker's settings, store and storage in that
application's :class:`~worker.app.WorkerContext`.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Task, current_app, shared_task, signals
from celery.utils.log import get_task_logger

from model.checkpoint import describe_checkpoints
from service.db import JobState
from service.queue import TASK_SEGMENT
from worker.app import WorkerContext, context
from worker.runner import default_checkpoints, get_predictor, run_job, worker_name

logger = get_task_logger(__name__)


@shared_task(
    name=TASK_SEGMENT, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def segment(self: Task, job_id: str) -> str:
    """Segments job ``job_id`` (its files are in storage; only the id travels)."""
    if not isinstance(job_id, str) or len(job_id) > 64:
        logger.error("dropping a message with an invalid job id: %r", job_id)
        return "invalid"
    ctx = context(self.app)
    outcome = run_job(job_id, ctx.settings, ctx.store, ctx.storage)
    logger.info("job %s: %s", job_id, outcome)
    if outcome == "busy":
        # Another worker holds it: look again once its heartbeat would have gone stale,
        # so the job is not lost if that worker dies.
        raise self.retry(countdown=ctx.settings.stale_after_s)
    return str(outcome)


# ------------------------------------------------------------------ worker lifecycle
_alive = threading.Event()


def _queue_name(ctx: WorkerContext) -> str:
    from model.tiling import resolve_device

    return ctx.settings.queue(resolve_device(ctx.settings.device).type)


def _announce(ctx: WorkerContext) -> None:
    from model.checkpoint import load_checkpoint
    from model.tiling import resolve_device

    checkpoints = [load_checkpoint(p) for p in default_checkpoints(ctx.settings)]
    device = resolve_device(ctx.settings.device).type
    ctx.store.register_worker(
        worker_name(), device, _queue_name(ctx), describe_checkpoints(checkpoints)
    )


def _keep_alive(ctx: WorkerContext) -> None:
    while not _alive.wait(ctx.settings.worker_heartbeat_s):
        try:
            ctx.store.worker_seen(worker_name())
        except Exception:
            logger.warning("worker heartbeat failed", exc_info=True)


@signals.worker_process_init.connect
def _load_network(**_kwargs: Any) -> None:
    get_predictor(context(current_app).settings)  # once per pool process, before the first job


@signals.worker_ready.connect
def _ready(sender: Any = None, **_kwargs: Any) -> None:
    ctx = context(sender.app if sender is not None else current_app)
    _announce(ctx)
    threading.Thread(target=_keep_alive, args=(ctx,), daemon=True, name="worker-heartbeat").start()
    # Jobs whose worker died (and, embedded, jobs whose message may be gone) are sent
    # again; the claim in run_job makes duplicates harmless.
    for job in ctx.store.orphans(ctx.settings.stale_after_s):
        if job.state == JobState.RUNNING or ctx.settings.embedded:
            segment.apply_async(args=[job.id], queue=job.queue or _queue_name(ctx))
            logger.info("re-sent job %s (%s)", job.id, job.state)


@signals.worker_shutdown.connect
def _shutdown(sender: Any = None, **_kwargs: Any) -> None:
    _alive.set()
    try:
        context(current_app).store.remove_worker(worker_name())
    except Exception:
        logger.warning("could not unregister the worker", exc_info=True)
