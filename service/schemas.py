"""Request options and response bodies of the API (one schema per use)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from model.defaults import DEFAULT_POSTPROCESS, NO_POSTPROCESS, POSTPROCESS_MEANINGS
from model.inference.report import CaseReportDict
from service.config import SERVICE_POSTPROCESS_MODES
from service.db import DeliveryStatus, JobState

#: What a job's ``postprocess`` option does: the deployment's mode, or none.
POSTPROCESS_DESCRIPTION = (
    "true: the post-processing this service is set up with, one of "
    + ", ".join(f"`{mode}`" for mode in SERVICE_POSTPROCESS_MODES)
    + f" (`OMNET_POSTPROCESS`; default `{DEFAULT_POSTPROCESS}`: "
    + f"{POSTPROCESS_MEANINGS[DEFAULT_POSTPROCESS]}); false: "
    + POSTPROCESS_MEANINGS[NO_POSTPROCESS]
)


class JobOptions(BaseModel):
    """Options of a job, sent as form fields beside the files."""

    postprocess: bool = Field(True, description=POSTPROCESS_DESCRIPTION)
    label_convention: Literal[4, 3] = Field(
        4, description="value written for enhancing tumour: 4 (BraTS 2018-2021) or 3 (2023)"
    )
    probabilities: bool = Field(False, description="also write per-class probability maps")
    preview: bool = Field(True, description="also render an overlay preview PNG")
    callback_url: str | None = Field(
        None,
        max_length=2048,
        json_schema_extra={"format": "uri"},
        description="an https URL that is sent a signed POST (Standard Webhooks) when the "
        "job succeeds, fails or is cancelled",
    )
    study_uid: str | None = Field(
        None,
        max_length=64,
        description="StudyInstanceUID of a study the worker retrieves from the configured "
        "DICOMweb source (WADO-RS), instead of uploaded files",
    )
    series: str | None = Field(
        None,
        max_length=1000,
        description="DICOM input: which series is which modality, overriding the rules, as "
        "comma-separated modality=SeriesInstanceUID (or =SeriesNumber), e.g. "
        "'t1ce=1.2.3,flair=7'",
    )
    destinations: str | None = Field(
        None,
        max_length=1000,
        description="DICOM input: comma-separated names of the configured DICOMweb "
        "destinations that the SEG (and preview) are stored to when the job succeeds; "
        "default: all of them; empty: none",
    )


#: What each uploaded file of a submission holds (descriptions in the OpenAPI schema).
UPLOAD_DESCRIPTIONS = {
    "t1": "T1-weighted volume",
    "t1ce": "contrast-enhanced T1 volume",
    "t2": "T2-weighted volume",
    "flair": "FLAIR volume",
    "image": "one 4D volume holding t1, t1ce, t2 and flair in that order, instead of the "
    "four files",
    "reference": "optional reference label map: the segmentation is scored against it",
    "study": "a DICOM study as one .zip file holding its MR series, instead of NIfTI volumes",
    "dicom": "DICOM files (.dcm) of the study's MR series, one per part (repeat the field), "
    "instead of NIfTI volumes",
}


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """A form field's schema: an optional value (``anyOf: [T, null]``) is a plain T that
    may be left out (a form cannot send null)."""
    variants = [v for v in schema.get("anyOf", []) if v.get("type") != "null"]
    if len(variants) != 1 or len(schema["anyOf"]) != 2:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**variants[0], **rest}


def submission_form(file_fields: Sequence[str]) -> dict[str, Any]:
    """The OpenAPI request body of a job submission (the route's ``openapi_extra``).

    The route reads its multipart form itself, so FastAPI cannot describe it: this is a
    form of the ``file_fields`` (binary uploads) and one text field per
    :class:`JobOptions` field, so that ``/docs`` can submit a case.
    """
    files: dict[str, Any] = {
        name: {
            "type": "string",
            "format": "binary",
            "contentMediaType": "application/octet-stream",
            "description": UPLOAD_DESCRIPTIONS.get(name, name)
            + ("" if name in ("study", "dicom") else "; .nii, .nii.gz or .nii.bz2"),
        }
        for name in file_fields
    }
    if "dicom" in files:  # a repeated field
        item = files["dicom"]
        files["dicom"] = {"type": "array", "items": item, "description": item["description"]}
    options = {
        name: _form_field(schema)
        for name, schema in JobOptions.model_json_schema()["properties"].items()
    }
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
    dicom_seg: str | None = None
    dicom_preview: str | None = None


class JobCreated(BaseModel):
    id: str
    state: JobState
    status_url: str
    queue_position: int | None
    created_at: datetime


class WebhookDelivery(BaseModel):
    """A delivery of the job and how it went: a completion event to ``callback_url``, or
    its DICOM results to a DICOMweb destination."""

    id: str = Field(description="webhooks: the webhook-id header, the same on every attempt")
    event: str = Field(
        description="job.succeeded, job.failed or job.cancelled (webhooks); "
        "dicomweb.store:<destination> (STOW-RS of the SEG and preview)"
    )
    url: str = Field(description="the callback URL, or the destination's DICOMweb root")
    status: DeliveryStatus = Field(description="pending, delivered or failed")
    attempts: int
    last_status_code: int | None = Field(None, description="HTTP status of the last answer")
    last_error: str | None = Field(None, description="why the last attempt failed")
    created_at: datetime
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = Field(None, description="when pending: the next attempt")
    finished_at: datetime | None = Field(None, description="when delivered or failed")


class QualityReport(BaseModel):
    """Signs of a likely failure, measured on the result (see the model card)."""

    review_recommended: bool = Field(description="a sign tripped: have a person look")
    flags: list[str] = Field(
        default_factory=list,
        description="stable names: rim (tumour in thin shells along the brain's edge), "
        "implausible_volume, task_disagreement (the network's coarse and fine passes "
        "disagreed on where the tumour is), brain_mask (the input does not look skull-stripped)",
    )
    measures: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list, description="one sentence per flag")


class JobStatus(BaseModel):
    id: str
    state: JobState
    progress: float = Field(description="0 to 1")
    stage: str | None = None
    queue_position: int | None = Field(
        None, description="queued jobs: 1 + the queued jobs submitted before it (any owner's)"
    )
    eta_s: float | None = Field(
        None,
        description="estimated seconds until the job finishes. Running: from its progress "
        "rate so far (the tiles done during inference), null before there is a rate. "
        "Queued: from the deployment's measured pace: the jobs ahead of it and it itself "
        "each take the median run time (start to finish) of the latest 50 succeeded jobs, "
        "one per live worker, the workers freeing as the running jobs finish; null before "
        "a job has succeeded, or with no live worker",
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    attempts: int
    options: JobOptions
    model: ModelRef | None = None
    error: ErrorDetail | None = None
    links: JobLinks
    metrics: CaseReportDict | None = Field(
        None,
        description="the case's report (succeeded jobs), the document `omnet segment` "
        "writes as <case>_metrics.json: region volumes in mL, scores against a reference, "
        "quality, warnings, how the result was made and, for DICOM input, the series used",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what the user should know about the input (e.g. it does not look "
        "skull-stripped)",
    )
    deliveries: list[WebhookDelivery] = Field(
        default_factory=list,
        description="completion events sent to callback_url and DICOMweb stores of the results",
    )
    quality: QualityReport | None = Field(
        None, description="signs of a likely failure in the result (succeeded jobs)"
    )


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
