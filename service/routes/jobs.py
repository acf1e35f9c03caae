"""The /v1/jobs routes: submit, follow, download, cancel and list segmentation jobs."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from celery import Celery
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from model.inference.report import upgrade_report
from service.config import Settings
from service.db import ACTIVE, FINISHED, Delivery, Job, JobState, JobStore, Pace, utcnow
from service.db.rates import progress_left_s
from service.deps import CeleryDep, OwnerDep, SettingsDep, StorageDep, StoreDep, get_settings
from service.dicomweb import STORE_EVENT
from service.errors import ApiError
from service.idempotency import answer_retry
from service.queue import send_job
from service.schemas import (
    ErrorBody,
    ErrorDetail,
    JobCreated,
    JobLinks,
    JobOptions,
    JobPage,
    JobStatus,
    ModelRef,
    QualityReport,
    WebhookDelivery,
    submission_form,
)
from service.storage import Storage
from service.uploads import FILE_FIELDS, OPTION_FIELDS, Submission, receive_case
from service.webhooks import CallbackRules, completion_event

router = APIRouter(prefix="/v1", tags=["jobs"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422, 503)
}


def _links(request: Request, job: Job) -> JobLinks:
    base = str(request.url_for("get_job", job_id=job.id))
    links = JobLinks(self=base)
    if job.state == JobState.SUCCEEDED and job.result:
        files = job.result.get("files", {})
        links.segmentation = f"{base}/segmentation"
        links.metrics = f"{base}/metrics"
        if "probabilities" in files:
            links.probabilities = f"{base}/probabilities"
        if "preview" in files:
            links.preview = f"{base}/preview.png"
        if "dicom_seg" in files:
            links.dicom_seg = f"{base}/segmentation?format=dicom-seg"
        if "dicom_preview" in files:
            links.dicom_preview = f"{base}/preview.dcm"
    return links


def _status(request: Request, store: JobStore, job: Job) -> JobStatus:
    """The status of ``job``, with its queue position, deliveries and (queued) the
    deployment's pace read now."""
    pace = _pace(request, store) if job.state == JobState.QUEUED else None
    return _status_from(request, job, store.queue_position(job), store.deliveries(job.id), pace)


def _pace(request: Request, store: JobStore) -> Pace:
    """The deployment's measured pace, which the time left of queued jobs comes from."""
    settings = get_settings(request)
    return store.pace(3 * settings.worker_heartbeat_s, settings.stale_after_s)


def _eta_s(job: Job) -> float | None:
    """Seconds a running job has left at its rate so far (elapsed x left / done)."""
    if job.state != JobState.RUNNING or job.started_at is None:
        return None
    left = progress_left_s((utcnow() - job.started_at).total_seconds(), job.progress)
    return None if left is None else round(left, 1)


def _report(job: Job) -> dict[str, Any] | None:
    """The report of a succeeded job in the current shape (see model/inference/report.py)."""
    document = (job.result or {}).get("metrics")
    return upgrade_report(document) if document else None


def _status_from(
    request: Request,
    job: Job,
    queue_position: int | None,
    deliveries: list[Delivery],
    pace: Pace | None = None,
) -> JobStatus:
    metrics = _report(job)
    eta_s = _eta_s(job)
    if job.state == JobState.QUEUED and queue_position is not None and pace is not None:
        eta_s = pace.eta_s(queue_position)
    warnings = list(metrics["warnings"]) if metrics else []
    quality = metrics.get("quality") if metrics else None
    return JobStatus(
        id=job.id,
        state=job.state,
        progress=round(job.progress, 4),
        stage=job.stage,
        queue_position=queue_position,
        eta_s=eta_s,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        expires_at=job.expires_at,
        attempts=job.attempts,
        options=JobOptions(**job.options),
        model=ModelRef(name=job.model_name, sha256=job.model_sha256) if job.model_name else None,
        error=ErrorDetail(code=job.error_code, message=job.error_message or "")
        if job.error_code
        else None,
        links=_links(request, job),
        metrics=metrics,
        warnings=warnings,
        quality=QualityReport.model_validate(quality) if quality else None,
        deliveries=[WebhookDelivery.model_validate(d, from_attributes=True) for d in deliveries],
    )


def _queue(settings: Settings, store: JobStore) -> str:
    live = store.live_workers(3 * settings.worker_heartbeat_s)
    return settings.queue("cuda" if any(w["device"] == "cuda" for w in live) else "cpu")


def _created(
    request: Request, response: Response, job: Job, queue_position: int | None
) -> JobCreated:
    url = str(request.url_for("get_job", job_id=job.id))
    response.headers["Location"] = url
    return JobCreated(
        id=job.id,
        state=job.state,
        status_url=url,
        queue_position=queue_position,
        created_at=job.created_at,
    )


def _existing(store: JobStore, owner: str, idempotency_key: str) -> tuple[Job, int | None] | None:
    """The job ``owner`` made with ``idempotency_key`` and its queue position, if any."""
    job = store.by_idempotency_key(owner, idempotency_key)
    return None if job is None else (job, store.queue_position(job))


def _record(
    settings: Settings,
    store: JobStore,
    owner: str,
    options: dict[str, Any],
    upload: Submission,
    idempotency_key: str | None,
) -> tuple[Job, bool, str, int | None]:
    """Records a submission's job (or finds the one a concurrent submission with the same
    key made): the job, whether it is new, its queue and its queue position."""
    queue = _queue(settings, store)
    job, created = store.create(
        owner, options, upload.inputs, queue, idempotency_key, upload.job_id, upload.sha256
    )
    return job, created, queue, store.queue_position(job)


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobCreated,
    responses=ERRORS,
    summary="Submit a case for segmentation",
    description=(
        "multipart/form-data with files t1, t1ce, t2, flair (.nii, .nii.gz or .nii.bz2; or one "
        "4D 'image'), an optional 'reference' label map, and option fields: "
        + ", ".join(OPTION_FIELDS)
        + ". An Idempotency-Key header makes a retried POST return the same job; the same "
        "key with other files or options is refused (422 idempotency_key_reused)."
    ),
    # The handler reads the form itself (to check it as it streams in), so the schema
    # of the request body is given here.
    openapi_extra=submission_form(FILE_FIELDS),
)
async def create_job(
    request: Request,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    celery: CeleryDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobCreated:
    # Asynchronous to read the upload as it streams in; every job store call runs in a
    # worker thread, so that a database that makes it wait (a write lock held, a server
    # failing over) never holds up the event loop and the other requests on it.
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 200:
        raise ApiError(400, "bad_idempotency_key", "Idempotency-Key must be 1 to 200 characters")
    known = None
    if idempotency_key:
        known = await run_in_threadpool(_existing, store, owner, idempotency_key)
        if known is not None and known[0].submission_sha256 is None:
            return _created(request, response, *known)  # no fingerprint to compare with
    upload = await receive_case(
        request, storage, settings, CallbackRules.for_owner(settings, owner)
    )
    if known is not None:  # a retry gets its job if it is the same submission
        storage.delete_job(upload.job_id)
        return _created(request, response, answer_retry(known[0], upload.sha256), known[1])
    options = upload.options.model_dump()
    if upload.options.callback_url:
        # Not an option the client sets: the URL its events link to (the one answered now).
        options["status_url"] = str(request.url_for("get_job", job_id=upload.job_id))
    try:
        job, created, queue, position = await run_in_threadpool(
            _record, settings, store, owner, options, upload, idempotency_key
        )
    except BaseException:
        storage.delete_job(upload.job_id)  # no record: nothing would ever remove its files
        raise
    if not created:  # a concurrent submission with the same key was recorded first
        storage.delete_job(upload.job_id)
        return _created(request, response, answer_retry(job, upload.sha256), position)
    await _send(celery, store, storage, job, queue, settings.broker_timeout_s)
    return _created(request, response, job, position)


async def _send(
    celery: Celery, store: JobStore, storage: Storage, job: Job, queue: str, timeout_s: float
) -> None:
    """Queues ``job`` from a worker thread, so that a hung broker never blocks the event
    loop; when the broker cannot be reached within ``timeout_s``, the job and its files
    go and the caller gets 503."""
    try:
        # The socket timeouts of the API's broker connection end a hung call after
        # timeout_s; the wait below is the backstop should one not.
        await asyncio.wait_for(
            run_in_threadpool(send_job, celery, job.id, queue, False), timeout_s + 1.0
        )
    except Exception as exc:
        await run_in_threadpool(store.delete, job.id)
        storage.delete_job(job.id)
        raise ApiError(
            503,
            "queue_unavailable",
            "the job queue cannot be reached, nothing was queued; try again shortly",
        ) from exc


def _is_job_id(text: str) -> bool:
    """Whether ``text`` is a job id as the service makes them: a UUID, lower-case
    hexadecimal digits in the 8-4-4-4-12 form."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _owned(store: JobStore, job_id: str, owner: str) -> Job:
    # An id that no job can have is not looked up: some databases refuse what it holds
    # (PostgreSQL text cannot contain NUL), and it is not echoed back.
    if not _is_job_id(job_id):
        raise ApiError(
            404,
            "job_not_found",
            "no such job: a job id is a UUID as POST /v1/jobs answered it, "
            "e.g. 6f1c2a9e-0b4d-4e8a-9c3f-2d7b5a1e8c40",
        )
    job = store.get(job_id, owner)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id} for this API key")
    return job


@router.get("/jobs/{job_id}", response_model=JobStatus, responses=ERRORS, summary="Job status")
def get_job(request: Request, job_id: str, store: StoreDep, owner: OwnerDep) -> JobStatus:
    return _status(request, store, _owned(store, job_id, owner))


#: Most jobs on a page of GET /v1/jobs.
MAX_PAGE = 100
#: Largest offset of GET /v1/jobs: the databases' 64-bit signed integers.
MAX_OFFSET = 2**63 - 1


@router.get("/jobs", response_model=JobPage, responses=ERRORS, summary="Your jobs, newest first")
def list_jobs(
    request: Request,
    store: StoreDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobPage:
    # A fixed number of statements whatever the page holds: the page, its total, and the
    # queue positions and deliveries of all its jobs at once.
    jobs, total = store.list_jobs(owner, limit, offset)
    positions = store.queue_positions(jobs)
    deliveries = store.deliveries_of([j.id for j in jobs])
    pace = _pace(request, store) if jobs else None
    items = [
        _status_from(request, j, positions.get(j.id), deliveries.get(j.id, []), pace) for j in jobs
    ]
    return JobPage(items=items, total=total, limit=limit, offset=offset)


def _result_file(storage: Storage, job: Job, kind: str) -> Path:
    if job.state != JobState.SUCCEEDED:
        detail = f"job {job.id} is {job.state}"
        if job.state in ACTIVE:
            raise ApiError(409, "not_ready", f"{detail}; poll its status until it succeeds")
        raise ApiError(409, "no_result", f"{detail}; it has no results")
    key = (job.result or {}).get("files", {}).get(kind)
    failed = (job.result or {}).get("failed", {}).get(kind)
    if key is None and failed:
        raise ApiError(
            404,
            "output_failed",
            f"job {job.id}: {failed}. Its label map (NIfTI) and metrics are kept: download "
            "them, or submit the study again once its headers are corrected",
        )
    if key is None:
        raise ApiError(
            404, "not_requested", f"job {job.id} did not produce {kind}; ask for it when submitting"
        )
    path = storage.path(key)
    if not path.is_file():
        raise ApiError(404, "expired", f"the {kind} of job {job.id} is no longer stored")
    return path


SEGMENTATION_FORMATS = ("nifti", "dicom-seg")


@router.get(
    "/jobs/{job_id}/segmentation",
    response_class=FileResponse,
    responses=ERRORS,
    summary="Label map: NIfTI on the input's grid, or (DICOM input) a DICOM SEG of the T1ce",
)
def get_segmentation(
    job_id: str,
    store: StoreDep,
    storage: StorageDep,
    owner: OwnerDep,
    format: Annotated[
        str, Query(description="nifti (default) or dicom-seg (jobs with DICOM input)")
    ] = "nifti",
) -> FileResponse:
    if format not in SEGMENTATION_FORMATS:
        raise ApiError(
            400,
            "bad_format",
            f"format must be one of {', '.join(SEGMENTATION_FORMATS)}; got {format!r}",
        )
    job = _owned(store, job_id, owner)
    if format == "dicom-seg":
        _dicom_result(job)
        path = _result_file(storage, job, "dicom_seg")
        return FileResponse(path, media_type="application/dicom", filename=f"{job.id}_seg.dcm")
    path = _result_file(storage, job, "segmentation")
    return FileResponse(path, media_type="application/gzip", filename=f"{job.id}_seg.nii.gz")


def _dicom_result(job: Job) -> None:
    """A DICOM result exists only for DICOM input; say so rather than 'not requested'."""
    dicom = job.options.get("study_uid") or "study" in job.inputs or "dicom" in job.inputs
    if job.state == JobState.SUCCEEDED and not dicom:
        raise ApiError(
            404,
            "not_dicom_input",
            f"job {job.id} was sent as NIfTI: a DICOM SEG references its source series, "
            "so it is made for DICOM input only; download the NIfTI label map",
        )


@router.get(
    "/jobs/{job_id}/preview.dcm",
    response_class=FileResponse,
    responses=ERRORS,
    summary="Overlay preview as a DICOM Secondary Capture (jobs with DICOM input)",
)
def get_preview_dicom(
    job_id: str, store: StoreDep, storage: StorageDep, owner: OwnerDep
) -> FileResponse:
    job = _owned(store, job_id, owner)
    _dicom_result(job)
    path = _result_file(storage, job, "dicom_preview")
    return FileResponse(path, media_type="application/dicom", filename=f"{job.id}_preview.dcm")


@router.post(
    "/jobs/{job_id}/deliveries/retry",
    response_model=JobStatus,
    responses=ERRORS,
    summary="Store a job's results again to the DICOMweb destinations that failed",
)
def retry_deliveries(request: Request, job_id: str, store: StoreDep, owner: OwnerDep) -> JobStatus:
    job = _owned(store, job_id, owner)
    if store.retry_deliveries(job.id, STORE_EVENT) == 0:
        raise ApiError(
            409,
            "nothing_to_retry",
            f"job {job.id} has no failed DICOMweb delivery; its deliveries are listed in its "
            "status",
        )
    return _status(request, store, job)


@router.get(
    "/jobs/{job_id}/probabilities",
    response_class=FileResponse,
    responses=ERRORS,
    summary="Probabilities of background, NCR/NET, edema and ET (4D NIfTI)",
)
def get_probabilities(
    job_id: str, store: StoreDep, storage: StorageDep, owner: OwnerDep
) -> FileResponse:
    job = _owned(store, job_id, owner)
    path = _result_file(storage, job, "probabilities")
    return FileResponse(
        path, media_type="application/gzip", filename=f"{job.id}_probabilities.nii.gz"
    )


@router.get("/jobs/{job_id}/metrics", responses=ERRORS, summary="Region volumes and scores (JSON)")
def get_metrics(job_id: str, store: StoreDep, storage: StorageDep, owner: OwnerDep) -> JSONResponse:
    job = _owned(store, job_id, owner)
    _result_file(storage, job, "metrics")
    return JSONResponse(_report(job) or {})


@router.get(
    "/jobs/{job_id}/preview.png",
    response_class=FileResponse,
    responses=ERRORS,
    summary="Overlay preview (PNG)",
)
def get_preview(job_id: str, store: StoreDep, storage: StorageDep, owner: OwnerDep) -> FileResponse:
    job = _owned(store, job_id, owner)
    return FileResponse(_result_file(storage, job, "preview"), media_type="image/png")


@router.delete(
    "/jobs/{job_id}",
    responses={**ERRORS, 204: {"description": "a finished job and its files were deleted"}},
    response_model=JobStatus,
    summary="Cancel a queued or running job, or delete a finished one; its files are deleted",
)
def delete_job(
    request: Request,
    job_id: str,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    owner: OwnerDep,
) -> Any:
    job = _owned(store, job_id, owner)
    if job.state in ACTIVE:
        event = completion_event(job, JobState.CANCELLED)  # recorded only if this cancels it
        job = store.cancel(job_id, owner, timedelta(hours=settings.retention_hours), event) or job
        storage.delete_job(job_id)
        if job.state == JobState.CANCELLED:
            return _status(request, store, job)
    storage.delete_job(job_id)
    if job.state in FINISHED:
        store.delete(job_id)
    return Response(status_code=204)
