"""Jobs whose worker died while running them: sent again ahead of the queue, or failed
with :data:`WORKER_LOST` once they have used up their attempts.

A process running a job can stop without a word (SIGKILL, the out-of-memory killer). Its
job's record still says running under it, and other workers leave the job alone until
its heartbeat is ``stale_after_s`` old. A process that saw it die knows sooner:

- a prefork worker's main process, told by its pool that the child running a job is
  gone (``worker.tasks.SegmentRequest``);
- ``omnet serve``, whose embedded worker exited (``service.cli.serve``).

They call :func:`release_lost`: the dead process's jobs are queued again at once (their
attempts stay counted) and sent at :data:`~service.queue.RESENT_PRIORITY`, which every
transport serves before the jobs sent as new, so such a job runs next rather than after
the backlog. Jobs whose death nobody saw (a whole worker killed, no supervisor) are sent
again, at the same priority, by the workers' reconciliation once their heartbeat is
stale (``worker.tasks.reconcile``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from datetime import timedelta

from celery import Celery

from service.config import Settings
from service.db import Job, JobState, JobStore
from service.queue import send_job
from service.storage import Storage
from service.webhooks import completion_event

logger = logging.getLogger(__name__)


def worker_name(pid: int | None = None) -> str:
    """The name a job record gives the process running it, ``host:pid``: this process, or
    process ``pid`` of this host (a pool child, or the embedded worker)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


#: Error code of a job whose workers stopped while running it ``max_attempts`` times.
WORKER_LOST = "worker_lost"


def worker_lost_message(attempts: int) -> str:
    """What a job that failed with :data:`WORKER_LOST` after ``attempts`` starts says."""
    times = "once (attempt 1)" if attempts == 1 else f"{attempts} times (attempts 1-{attempts})"
    return (
        f"the worker running this job stopped {times}; the case may need more memory or "
        "time than the worker has (killed for memory, or past a hard time limit). Ask the "
        "operator to check the workers' logs and memory; it was not started again "
        "(OMNET_MAX_ATTEMPTS)"
    )


def fail_exhausted(job: Job, settings: Settings, store: JobStore, storage: Storage) -> bool:
    """Fails ``job`` with :data:`WORKER_LOST` (and its webhook event) if a worker could
    claim it but it was started ``settings.max_attempts`` times already; True if it did.
    Its partial outputs go, its inputs stay until the record expires."""
    if job.attempts < settings.max_attempts:
        return False
    message = worker_lost_message(job.attempts)
    event = completion_event(job, JobState.FAILED, error=(WORKER_LOST, message))
    failed = store.fail_exhausted(
        job.id,
        settings.stale_after_s,
        settings.max_attempts,
        timedelta(hours=settings.retention_hours),
        WORKER_LOST,
        message,
        event,
    )
    if failed:
        logger.error("job %s: %s", job.id, message)
        shutil.rmtree(storage.outputs_dir(job.id), ignore_errors=True)
    return failed


def release_lost(
    settings: Settings,
    store: JobStore,
    storage: Storage,
    celery: Celery,
    worker: str,
    job_id: str | None = None,
) -> list[str]:
    """Releases the jobs that ``worker`` (a job record's worker name, ``host:pid``) was
    running when it died; only job ``job_id`` when given. The caller must know that the
    process is gone. Each is queued again and sent at
    :data:`~service.queue.RESENT_PRIORITY`, or, started ``max_attempts`` times already,
    fails with :data:`WORKER_LOST`. Returns the ids of the jobs released (sent or failed).

    Raises what the job store or the broker raises; a job released but not sent is
    queued without a message, which the workers' reconciliation sends once it is
    ``stale_after_s`` old.
    """
    released = store.release(worker, job_id)
    for job in released:
        if fail_exhausted(job, settings, store, storage):
            continue
        send_job(celery, job.id, job.queue or settings.queue("cpu"), retry=False, resent=True)
        logger.warning(
            "job %s: its worker %s died while running it (attempt %d); queued it again, "
            "ahead of the jobs sent after it",
            job.id,
            worker,
            job.attempts,
        )
    return [job.id for job in released]
