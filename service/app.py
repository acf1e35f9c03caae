"""The FastAPI application: routes, error handling, upload limits, metrics, clean-up."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import errors
from service.config import Settings, get_settings
from service.deps import _storage, _store
from service.routes import jobs, system
from service.telemetry import RequestMetrics, watch_jobs
from service.uploads import BodySizeLimit

logger = logging.getLogger(__name__)


def purge_expired(settings: Settings) -> int:
    """Deletes the files and records of jobs past their retention period."""
    store, storage = _store(settings.database), _storage(str(settings.storage_dir))
    removed = 0
    for job_id in store.expired():
        storage.delete_job(job_id)
        store.delete(job_id)
        removed += 1
    if removed:
        logger.info("purged %d expired jobs", removed)
    return removed


def _cleaner(settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(settings.cleanup_interval_s):
        try:
            purge_expired(settings)
        except Exception:
            logger.warning("purging expired jobs failed", exc_info=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.storage_dir.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        store = _store(settings.database)
        watch_jobs(store)
        stop = threading.Event()
        thread = threading.Thread(target=_cleaner, args=(settings, stop), daemon=True)
        thread.start()
        purge_expired(settings)
        yield
        stop.set()

    app = FastAPI(
        title="omnet",
        version="0.1.0",
        summary="Brain-tumour segmentation with OM-Net + cross-task guided attention",
        lifespan=lifespan,
    )
    app.include_router(jobs.router)
    app.include_router(system.router)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_upload_mb * 2**20))
    app.add_middleware(RequestMetrics)
    return app
