"""Dependencies of the routes: settings, job store, storage, broker and the caller.

Everything comes from the application's state, set once by
:func:`service.app.create_app` from the settings it was given; no route reads the
environment or a process-wide settings object.
"""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request

from service.config import Settings
from service.db import JobStore
from service.errors import ApiError
from service.storage import Storage


def get_settings(request: Request) -> Settings:
    """The settings the application was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_celery(request: Request) -> Celery:
    """The API's Celery client (it only sends tasks by name)."""
    celery: Celery = request.app.state.celery
    return celery


def get_owner(
    settings: Annotated[Settings, Depends(get_settings)],
    x_api_key: Annotated[str | None, Header(description="your API key")] = None,
) -> str:
    """The caller's identity from the X-API-Key header; 'anonymous' in open mode."""
    keys = settings.keys()
    if x_api_key:
        owner = keys.get(x_api_key)
        if owner is None:
            raise ApiError(
                401,
                "invalid_api_key",
                "the X-API-Key is not known; check the key",
                headers={"WWW-Authenticate": "ApiKey"},
            )
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
