"""Request options and response bodies of the API (one schema per use)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.db import JobState


class JobOptions(BaseModel):
    """Options of a job, sent as form fields beside the files."""

    postprocess: bool = Field(True, description="small-component removal and edema relabelling")
    label_convention: Literal[4, 3] = Field(
        4, description="value written for enhancing tumour: 4 (BraTS 2018-2021) or 3 (2023)"
    )
    probabilities: bool = Field(False, description="also write per-class probability maps")
    preview: bool = Field(True, description="also render an overlay preview PNG")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelRef(BaseModel):
    name: str | None = None
    sha256: str | None = None


class JobLinks(BaseModel):
    self: str
    segmentation: str | None = None
    probabilities: str | None = None
    metrics: str | None = None
    preview: str | None = None


class JobCreated(BaseModel):
    id: str
    state: JobState
    status_url: str
    queue_position: int | None
    created_at: datetime


class JobStatus(BaseModel):
    id: str
    state: JobState
    progress: float = Field(description="0 to 1")
    stage: str | None = None
    queue_position: int | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    attempts: int
    options: JobOptions
    model: ModelRef | None = None
    error: ErrorDetail | None = None
    links: JobLinks
    metrics: dict[str, Any] | None = Field(None, description="region volumes (and scores)")


class JobPage(BaseModel):
    items: list[JobStatus]
    total: int
    limit: int
    offset: int


class ServedModel(BaseModel):
    workers: list[dict[str, Any]]
    models: list[dict[str, Any]]


class Health(BaseModel):
    status: str
    checks: dict[str, Any] = {}
