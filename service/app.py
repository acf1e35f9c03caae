"""The FastAPI application: routes, error handling, upload limits, metrics, clean-up
(expired jobs, and staging folders of uploads an API process left when it died)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from fastapi import FastAPI

from service import errors
from service.config import Settings, get_settings
from service.db import JobStore
from service.queue import make_celery
from service.routes import inputs, jobs, system, web
from service.storage import Storage
from service.telemetry import RequestMetrics, job_registry
from service.uploads import BodySizeLimit

logger = logging.getLogger(__name__)


def purge_expired(store: JobStore, storage: Storage) -> int:
    """Deletes the files and records of jobs past their retention period."""
    removed = 0
    for job_id in store.expired():
        storage.delete_job(job_id)
        store.delete(job_id)
        removed += 1
    if removed:
        logger.info("purged %d expired jobs", removed)
    return removed


def _purge(store: JobStore, storage: Storage, interval_s: float) -> None:
    """:func:`purge_expired`, whose failure is logged (the next round tries again): a
    job database that does not answer in one line, anything else with its traceback."""
    try:
        purge_expired(store, storage)
    except (sa.exc.OperationalError, sa.exc.TimeoutError) as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"]
        logger.warning(
            "purging expired jobs failed, the job database did not answer (%s); trying "
            "again in %.0f s",
            cause[0],
            interval_s,
        )
    except Exception:
        logger.warning("purging expired jobs failed", exc_info=True)


#: The least time a staging folder stays unchanged before it counts as left behind.
STAGING_FLOOR_S = 3600.0


def staging_max_age_s(settings: Settings) -> float:
    """How long a staging folder may stay unchanged before :func:`sweep_staging` removes
    it: twice ``OMNET_JOB_TIME_LIMIT_S``, at least an hour.

    An upload is staged only once its whole body has arrived (until then the parts wait
    in the request's own temporary files, which go with the process); it is then copied
    in and checked, which reads each volume once: far less time than a worker takes to
    segment the case, so well within a job's time limit.
    """
    return max(2 * settings.job_time_limit_s, STAGING_FLOOR_S)


def sweep_staging(storage: Storage, max_age_s: float) -> int:
    """Removes the staging folders of uploads that an API process stopped checking (it
    was killed mid-upload); logs, never raises."""
    try:
        removed = storage.sweep_staging(max_age_s)
    except OSError:
        logger.warning("sweeping the staging folder failed", exc_info=True)
        return 0
    if removed:
        logger.info(
            "removed %d staging folders left by an API process that stopped mid-upload "
            "(unchanged for over %.0f s)",
            len(removed),
            max_age_s,
        )
    return len(removed)


def _cleaner(settings: Settings, store: JobStore, storage: Storage, stop: threading.Event) -> None:
    interval_s = settings.cleanup_interval_s
    while not stop.wait(interval_s):
        _purge(store, storage, interval_s)
        sweep_staging(storage, staging_max_age_s(settings))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application for ``settings`` (default: read from the environment).

    The settings, job store, storage and Celery client are built here, once, and kept
    in ``app.state``, where the route dependencies (:mod:`service.deps`) find them.
    """
    settings = settings or get_settings()
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.database, settings.database_timeout_s)
    storage = Storage(settings.storage_dir)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        thread = threading.Thread(
            target=_cleaner,
            args=(settings, store, storage, stop),
            daemon=True,
        )
        thread.start()
        # The database answered create_app's schema check; should it stop answering
        # now, the API starts all the same and answers 503 until it is back.
        _purge(store, storage, settings.cleanup_interval_s)
        sweep_staging(storage, staging_max_age_s(settings))
        yield
        stop.set()

    app = FastAPI(
        title="omnet",
        version="0.1.0",
        summary="Brain-tumour segmentation with OM-Net + cross-task guided attention",
        lifespan=lifespan,
        docs_url=None,  # served by service.routes.web from local files, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.celery = make_celery(settings, client=True)
    app.state.job_metrics = job_registry(store)
    app.include_router(jobs.router)
    app.include_router(inputs.router)
    app.include_router(system.router)
    web.install(app)
    errors.install(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=int(settings.max_upload_mb * 2**20),
        idle_timeout_s=settings.upload_idle_timeout_s,
    )
    app.add_middleware(RequestMetrics)
    return app
