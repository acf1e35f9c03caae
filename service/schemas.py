"""Request options and response bodies of the API (one schema per use)."""

from __future__ import annotations

from collections.abc import Sequence
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


#: What each uploaded file of a submission holds (descriptions in the OpenAPI schema).
UPLOAD_DESCRIPTIONS = {
    "t1": "T1-weighted volume",
    "t1ce": "contrast-enhanced T1 volume",
    "t2": "T2-weighted volume",
    "flair": "FLAIR volume",
    "image": "one 4D volume holding t1, t1ce, t2 and flair in that order, instead of the "
    "four files",
    "reference": "optional reference label map: the segmentation is scored against it",
}


def submission_form(file_fields: Sequence[str]) -> dict[str, Any]:
    """The OpenAPI request body of a job submission (the route's ``openapi_extra``).

    The route reads its multipart form itself, so FastAPI cannot describe it: this is a
    form of the ``file_fields`` (binary uploads) and one text field per
    :class:`JobOptions` field, so that ``/docs`` can submit a case.
    """
    files = {
        name: {
            "type": "string",
            "format": "binary",
            "contentMediaType": "application/octet-stream",
            "description": f"{UPLOAD_DESCRIPTIONS.get(name, name)}; .nii, .nii.gz or .nii.bz2",
        }
        for name in file_fields
    }
    options = JobOptions.model_json_schema()["properties"]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "title": "Submission",
                        "description": "the four modalities (or one 4D 'image'), an "
                        "optional reference and the job options",
                        "properties": {**files, **options},
                    }
                }
            },
        }
    }


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
