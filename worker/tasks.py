"""Celery tasks: thin wrappers that hand a job id to :mod:`worker.runner`."""

from __future__ import annotations

import threading
from functools import lru_cache

from celery import signals
from celery.utils.log import get_task_logger

from service.config import get_settings
from service.db import JobStore
from service.storage import Storage
from worker.app import TASK_SEGMENT, app
from worker.runner import default_checkpoints, describe_model, get_predictor, run_job, worker_name

logger = get_task_logger(__name__)


@lru_cache(maxsize=1)
def _store() -> JobStore:
    get_settings().storage_dir.mkdir(parents=True, exist_ok=True)
    return JobStore(get_settings().database)


@lru_cache(maxsize=1)
def _storage() -> Storage:
    return Storage(get_settings().storage_dir)


@app.task(
    name=TASK_SEGMENT, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def segment(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """Segments job ``job_id`` (its files are in storage; only the id travels)."""
    if not isinstance(job_id, str) or len(job_id) > 64:
        logger.error("dropping a message with an invalid job id: %r", job_id)
        return "invalid"
    settings = get_settings()
    outcome = run_job(job_id, settings, _store(), _storage())
    logger.info("job %s: %s", job_id, outcome)
    if outcome == "busy":
        # Another worker holds it: look again once its heartbeat would have gone stale,
        # so the job is not lost if that worker dies.
        raise self.retry(countdown=settings.stale_after_s)
    return outcome


# ------------------------------------------------------------------ worker lifecycle
_alive = threading.Event()


def _queue_name() -> str:
    from model.tiling import resolve_device

    return get_settings().queue(resolve_device(get_settings().device).type)


def _announce() -> None:
    settings = get_settings()
    from model.checkpoint import load_checkpoint
    from model.tiling import resolve_device

    checkpoints = [load_checkpoint(p) for p in default_checkpoints(settings)]
    device = resolve_device(settings.device).type
    _store().register_worker(worker_name(), device, _queue_name(), describe_model(checkpoints))


def _keep_alive() -> None:
    settings = get_settings()
    while not _alive.wait(settings.worker_heartbeat_s):
        try:
            _store().worker_seen(worker_name())
        except Exception:
            logger.warning("worker heartbeat failed", exc_info=True)


@signals.worker_process_init.connect
def _load_network(**_kwargs: object) -> None:
    get_predictor(get_settings())  # once per pool process, before the first job


@signals.worker_ready.connect
def _ready(sender: object = None, **_kwargs: object) -> None:
    settings = get_settings()
    _announce()
    threading.Thread(target=_keep_alive, daemon=True, name="worker-heartbeat").start()
    # Jobs whose worker died (and, embedded, jobs whose message may be gone) are sent
    # again; the claim in run_job makes duplicates harmless.
    for job in _store().orphans(settings.stale_after_s):
        if job.state == "running" or settings.embedded:
            segment.apply_async(args=[job.id], queue=job.queue or _queue_name())
            logger.info("re-sent job %s (%s)", job.id, job.state)


@signals.worker_shutdown.connect
def _shutdown(**_kwargs: object) -> None:
    _alive.set()
    try:
        _store().remove_worker(worker_name())
    except Exception:
        logger.warning("could not unregister the worker", exc_info=True)
