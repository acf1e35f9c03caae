"""Celery tasks: thin wrappers that hand a job id to :mod:`worker.runner`.

The task is a shared task, bound to the application that :func:`worker.app.create_worker_app`
builds; it and the signal handlers find the worker's settings, store and storage in that
application's :class:`~worker.context.WorkerContext`. This module does not import
:mod:`worker.app`: the application imports its tasks, never the other way.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

from celery import Task, current_app, shared_task, signals
from celery.utils.log import get_task_logger
from celery.worker.request import Request

from model.net.checkpoint import describe_checkpoints
from service.db import FINISHED, utcnow
from service.deliveries import run_deliveries
from service.queue import (
    TASK_SEGMENT,
    BrokerLedger,
    FolderLedger,
    Ledger,
    broker_folder,
    send_job,
)
from service.recovery import fail_exhausted, release_lost
from worker.context import WorkerContext, context
from worker.runner import default_checkpoints, get_predictor, run_job, worker_name

logger = get_task_logger(__name__)


class SegmentRequest(Request):
    """A segmentation message in a worker's main process.

    When the pool process running it dies, Celery rejects the message back to its queue
    (``reject_on_worker_lost``), and kombu's Redis transport puts a rejected message at
    the end that is served last: behind the whole backlog. Instead, the job is released
    (:func:`service.recovery.release_lost`: queued again and sent at
    :data:`~service.queue.RESENT_PRIORITY`, or failed with ``worker_lost`` at its last
    attempt) and the message acknowledged. When that fails (the job database or the
    broker does not answer), the message is rejected as Celery would; the
    reconciliation then sends the job again once its heartbeat is stale.
    """

    def reject(self, requeue: bool = False) -> None:
        if requeue and not self.acknowledged and _send_again(self):
            self.acknowledge()
            return
        super().reject(requeue=requeue)


def _send_again(request: Request) -> bool:
    """Releases and sends again the job of ``request``, whose pool process died; False
    if that could not be done."""
    ctx = context(request.app)
    job_id = str(request.id)
    try:
        if request.worker_pid and release_lost(
            ctx.settings,
            ctx.store,
            ctx.storage,
            request.app,
            worker_name(request.worker_pid),
            job_id,
        ):
            return True
        # The process died before it claimed the job (or the job is no longer its):
        # the message still goes before the ones sent after it.
        job = ctx.store.get(job_id)
        if job is not None and job.state not in FINISHED:
            queue = job.queue or request.delivery_info.get("routing_key") or _queue_name(ctx)
            send_job(request.app, job_id, queue, retry=False, resent=True)
        return True
    except Exception:
        logger.warning(
            "job %s: could not send it again after its pool process died; its message goes "
            "back to the queue",
            job_id,
            exc_info=True,
        )
        return False


@shared_task(
    name=TASK_SEGMENT,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
    Request=SegmentRequest,
)
def segment(self: Task, job_id: str) -> str:
    """Segments job ``job_id`` (its files are in storage; only the id travels)."""
    if not isinstance(job_id, str) or len(job_id) > 64:
        logger.error("dropping a message with an invalid job id: %r", job_id)
        return "invalid"
    ctx = context(self.app)
    outcome = run_job(job_id, ctx.settings, ctx.store, ctx.storage)
    # "busy": another live worker runs it; this copy of the message is dropped. Should
    # that worker die, the reconciliation below sends the job again (no delayed retry
    # message, whose lease nobody could renew while it waits).
    logger.info("job %s: %s", job_id, outcome)
    return str(outcome)


# ------------------------------------------------------------------ worker lifecycle
_alive = threading.Event()


def _queue_name(ctx: WorkerContext) -> str:
    from model.inference.tiling import resolve_device

    return ctx.settings.queue(resolve_device(ctx.settings.device).type)


def _announce(ctx: WorkerContext) -> None:
    from model.inference.tiling import resolve_device
    from model.net.checkpoint import read_checkpoint_info

    # Read, not built: this runs in the pool's parent, which must not start PyTorch's
    # OpenMP threads before it forks a child (the child would hang in them).
    checkpoints = [read_checkpoint_info(p) for p in default_checkpoints(ctx.settings)]
    device = resolve_device(ctx.settings.device).type
    ctx.store.register_worker(
        worker_name(), device, _queue_name(ctx), describe_checkpoints(checkpoints)
    )


def _keep_alive(ctx: WorkerContext, ledger: Ledger | None) -> None:
    """Every heartbeat: mark this worker alive and renew the leases of the messages it
    holds; every reconciliation period: re-send the jobs that lost their message."""
    period = max(ctx.settings.worker_heartbeat_s, ctx.settings.stale_after_s / 4)
    next_reconcile = time.monotonic()
    while not _alive.wait(ctx.settings.worker_heartbeat_s):
        try:
            ctx.store.worker_seen(worker_name())
            if ledger is not None:
                ledger.renew(_held_delivery_tags())
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + period
                    reconcile(ctx, ledger, period)
        except Exception:
            logger.warning("worker heartbeat failed", exc_info=True)


def _held_delivery_tags() -> set[str]:
    """Delivery tags of the messages this worker process has taken and not acknowledged."""
    from celery.worker import state

    tags = set()
    for request in [*state.active_requests, *state.reserved_requests]:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            tags.add(str(tag))
    return tags


def _held_job_ids() -> set[str]:
    """Ids of the jobs whose messages this worker process has taken and not acknowledged
    (task ids are job ids)."""
    from celery.worker import state

    return {
        str(request.id)
        for request in [*state.active_requests, *state.reserved_requests]
        if getattr(request, "id", None)
    }


def _held(ctx: WorkerContext, ledger: Ledger) -> set[str]:
    """Jobs that have a message: in the broker, or taken by this process."""
    queues = {ctx.settings.queue("cpu"), ctx.settings.queue("cuda")}
    return ledger.held_job_ids(queues) | _held_job_ids()


def reconcile(ctx: WorkerContext, ledger: Ledger, period_s: float) -> list[str]:
    """Sends again, ahead of the jobs sent as new, every job whose record is queued (for
    longer than the stale interval), or running under a worker silent for that long, and
    that has no message left in the broker (Redis, or the embedded mode's folder); one
    whose workers stopped while running it ``max_attempts`` times fails instead
    (:func:`service.recovery.fail_exhausted`). One worker at a time does it (a lock for
    ``period_s``); duplicates would be harmless anyway (the claim). Returns the ids sent."""
    settings = ctx.settings
    if not ledger.try_lock(f"{settings.queue_prefix}.reconcile", period_s):
        return []
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    orphans = [j for j in ctx.store.orphans(settings.stale_after_s) if j.created_at < cutoff]
    if not orphans:
        return []
    held = _held(ctx, ledger)
    sent = []
    for job in orphans:
        if fail_exhausted(job, settings, ctx.store, ctx.storage):
            continue
        if job.id not in held:
            send_job(current_app, job.id, job.queue or _queue_name(ctx), resent=True)
            sent.append(job.id)
            logger.warning("job %s (%s) had no message left; sent it again", job.id, job.state)
    return sent


@signals.worker_process_init.connect
def _load_network(**_kwargs: Any) -> None:
    get_predictor(context(current_app).settings)  # once per pool process, before the first job


@signals.worker_ready.connect
def _ready(sender: Any = None, **_kwargs: Any) -> None:
    ctx = context(sender.app if sender is not None else current_app)
    _announce(ctx)
    settings = ctx.settings
    ledger: Ledger | None = None
    if settings.embedded:
        ledger = FolderLedger(broker_folder(settings))
    elif settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://")):
        ledger = BrokerLedger(settings.broker_url, settings.broker_timeout_s)
    threading.Thread(
        target=_keep_alive, args=(ctx, ledger), daemon=True, name="worker-heartbeat"
    ).start()
    # Webhook events wait in the job store; this process sends those that are due (in
    # the pool's parent: no job holds it up).
    threading.Thread(
        target=run_deliveries, args=(settings, ctx.store, _alive), daemon=True, name="webhooks"
    ).start()
    if isinstance(ledger, FolderLedger):
        # The filesystem transport keeps no record of handed-out messages: jobs queued,
        # or running under a silent worker, whose message is not in its folder are sent
        # again at once (the claim makes duplicates harmless). A job whose worker died
        # only now is found by the reconciliation once its heartbeat is stale.
        held = _held(ctx, ledger)
        for job in ctx.store.orphans(settings.stale_after_s):
            if fail_exhausted(job, settings, ctx.store, ctx.storage) or job.id in held:
                continue
            send_job(current_app, job.id, job.queue or _queue_name(ctx), resent=True)
            logger.info("re-sent job %s (%s)", job.id, job.state)


@signals.worker_shutdown.connect
def _shutdown(sender: Any = None, **_kwargs: Any) -> None:
    _alive.set()
    try:
        context(current_app).store.remove_worker(worker_name())
    except Exception:
        logger.warning("could not unregister the worker", exc_info=True)
