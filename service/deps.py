"""Dependencies of the routes: settings, job store, storage, broker and the caller."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from celery import Celery
from fastapi import Depends, Header

from service.config import Settings, get_settings
from service.db import JobStore
from service.errors import ApiError
from service.storage import Storage


@lru_cache(maxsize=4)
def _store(url: str) -> JobStore:
    return JobStore(url)


@lru_cache(maxsize=4)
def _storage(root: str) -> Storage:
    return Storage(root)


def get_store(settings: Annotated[Settings, Depends(get_settings)]) -> JobStore:
    return _store(settings.database)


def get_storage(settings: Annotated[Settings, Depends(get_settings)]) -> Storage:
    return _storage(str(settings.storage_dir))


@lru_cache(maxsize=1)
def _celery() -> Celery:
    from worker.app import make_celery

    return make_celery(get_settings())


def get_celery() -> Celery:
    return _celery()


def get_owner(
    settings: Annotated[Settings, Depends(get_settings)],
    x_api_key: Annotated[str | None, Header(description="your API key")] = None,
) -> str:
    """The caller's identity from the X-API-Key header; 'anonymous' in open mode."""
    keys = settings.keys()
    if x_api_key:
        owner = keys.get(x_api_key)
        if owner is None:
            raise ApiError(401, "invalid_api_key", "the X-API-Key is not known; check the key")
        return owner
    if settings.open_mode:
        return "anonymous"
    raise ApiError(
        401,
        "missing_api_key",
        "send your API key in the X-API-Key header",
        headers={"WWW-Authenticate": "ApiKey"},
    )


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
OwnerDep = Annotated[str, Depends(get_owner)]
