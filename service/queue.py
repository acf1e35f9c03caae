"""The job queue that the API and the workers share: task and queue names, and the
Celery application factory, configured from :class:`service.config.Settings`.

Nothing is built at import time: the API builds its client application in
:func:`service.app.create_app`, a worker builds its own in :mod:`worker.app`.

Redis is the broker and result store when ``OMNET_BROKER_URL`` is set. Without it the
embedded mode needs no server: Celery's filesystem transport (messages are files in the
storage folder) with results in SQLite.

Delivery guarantees: late acknowledgement (a job is acknowledged when it ends, not when
it starts), one job prefetched per worker, a job whose worker process dies is rejected
back to the queue, and Redis re-delivers unacknowledged jobs after the visibility
timeout (longer than the longest job). Job records add a claim with a heartbeat so a
re-delivered job runs once (see :mod:`worker.runner`).
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from service.config import Settings

#: Name of the segmentation task (the API sends it, the workers run it).
TASK_SEGMENT = "omnet.segment"


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """A Celery application for ``settings``; ``include`` names the task modules a worker
    imports (the API only sends tasks by name and includes none).

    In embedded mode this creates the filesystem transport's folders under the storage
    folder.
    """
    if settings.embedded:
        broker_dir = (settings.storage_dir / "broker").resolve()
        for sub in ("queue", "processed", "control"):
            (broker_dir / sub).mkdir(parents=True, exist_ok=True)
        broker = "filesystem://"
        transport_options: dict[str, object] = {
            "data_folder_in": str(broker_dir / "queue"),
            "data_folder_out": str(broker_dir / "queue"),
            "processed_folder": str(broker_dir / "processed"),
            "control_folder": str(broker_dir / "control"),
            "store_processed": False,
        }
        backend = settings.result_backend or (
            f"db+sqlite:///{(settings.storage_dir / 'celery-results.sqlite').resolve()}"
        )
    else:
        broker = settings.broker_url or ""
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
        backend = settings.result_backend or broker
    app = Celery("omnet", broker=broker, backend=backend, include=list(include))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options if not settings.embedded else {},
        result_expires=max(1, int(settings.retention_hours * 3600)),
        task_default_queue=settings.queue("cpu"),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_time_limit=int(settings.job_time_limit_s + 120),
        task_soft_time_limit=int(settings.job_time_limit_s + 60),
    )
    return app
