"""DICOMweb: studies retrieved from a PACS for a job, results stored back to one.

- Submission: a job may name a ``study_uid`` instead of uploading files; the API checks
  with QIDO-RS that the configured source holds it (:func:`find_study`), and the worker
  retrieves its MR series with WADO-RS into the job's inputs (:func:`retrieve_study`),
  after which the job runs like an uploaded DICOM study.
- Results: when a DICOM job succeeds, one delivery per destination is recorded with the
  state change (:func:`store_deliveries`); the delivery thread stores the SEG (and the
  Secondary Capture preview) there with STOW-RS (:func:`store_attempt`), retrying with
  back-off (:mod:`service.deliveries`). A PACS that is down loses nothing: the files
  stay downloadable and a failed delivery can be made again
  (``POST /v1/jobs/{id}/deliveries/retry``).

Destinations are configured by the operator, by name (``OMNET_DICOMWEB_DESTINATIONS``);
a job names them, never a URL, so that a caller cannot make the service send data to
an address of its choosing. URLs may carry HTTP basic credentials; they are kept out of
job records and logs.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
import retrying  # type: ignore[import-untyped]
from dicomweb_client import DICOMwebClient

from service.config import DicomWebEndpoint, Settings
from service.db import AttemptResult, Delivery, NewDelivery
from service.storage import Storage

logger = logging.getLogger(__name__)

#: Event of a delivery that stores a job's results to a destination: prefix + its name.
STORE_EVENT = "dicomweb.store:"
#: The SOP classes that are retrieved for a job (MR images); other series of a study
#: (earlier SEGs, reports, presentation states) are not downloaded.
RETRIEVED_MODALITIES = ("MR",)
#: Tag of SeriesInstanceUID, StudyInstanceUID and Modality in DICOM JSON.
_SERIES_UID, _STUDY_UID, _MODALITY = "0020000E", "0020000D", "00080060"
_SERIES_DESCRIPTION, _SERIES_NUMBER, _INSTANCES = "0008103E", "00200011", "00201209"


class DicomWebError(Exception):
    """A DICOMweb exchange failed; ``code`` says how (stable, for the API and jobs).
    ``transient``: the server could not be reached, timed out or answered 5xx or 429, so
    the same request may well succeed later."""

    def __init__(self, code: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient


def client(endpoint: DicomWebEndpoint, timeout_s: float, retries: bool = True) -> DICOMwebClient:
    """A client of ``endpoint``; without ``retries`` each request is made once (the
    delivery outbox retries stores itself, with its own back-off)."""
    session = requests.Session()
    if endpoint.username is not None:
        session.auth = (endpoint.username, endpoint.password or "")
    web = DICOMwebClient(endpoint.url, session=session, timeout=timeout_s)
    web.set_http_retry_params(retry=retries, max_attempts=3, wait_exponential_multiplier=500)
    return web


#: What a DICOMweb exchange raises when it fails: requests' errors, the OSError of a
#: file, and dicomweb-client's RetryError when a retriable status (408, 429, 503, 504)
#: outlasts its attempts.
_FAILURES = (requests.RequestException, OSError, retrying.RetryError)


def _unwrap(exc: Exception) -> Exception:
    """A RetryError as the HTTPError its last response stands for; others as they are."""
    if isinstance(exc, retrying.RetryError):
        response = getattr(exc.last_attempt, "value", None)
        if isinstance(response, requests.Response):
            return requests.HTTPError(
                f"{response.status_code} {response.reason}", response=response
            )
    return exc


def _value(item: Mapping[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _failure(endpoint: DicomWebEndpoint, what: str, exc: Exception) -> DicomWebError:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        why = f"HTTP {status} {exc.response.reason or ''}".strip()
        if status in (401, 403):
            return DicomWebError(
                "dicomweb_refused",
                f"DICOMweb server {endpoint.name} refused to {what} ({why}); the operator "
                "must check its credentials",
            )
        transient = status >= 500 or status == 429
    else:
        why = f"{type(exc).__name__}: {exc}"[:300]
        # Unreachable, timed out, cut off; not this side's own OSError (a full disk).
        transient = isinstance(exc, requests.RequestException)
    return DicomWebError(
        "dicomweb_unavailable",
        f"DICOMweb server {endpoint.name} could not {what} ({why}); try again later",
        transient=transient,
    )


def find_study(
    endpoint: DicomWebEndpoint, study_uid: str, timeout_s: float, retries: bool = True
) -> list[dict[str, Any]]:
    """The series of ``study_uid`` on ``endpoint`` (QIDO-RS): UID, modality,
    description, number and instance count of each.

    Raises:
        DicomWebError: ``study_not_found`` (no series), ``dicomweb_unavailable`` or
            ``dicomweb_refused``.
    """
    web = client(endpoint, timeout_s, retries)
    try:
        found = web.search_for_series(
            study_instance_uid=study_uid,
            fields=["SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"],
            get_remaining=True,
        )
    except _FAILURES as raised:
        exc = _unwrap(raised)
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            if exc.response.status_code == 404:
                found = []
            else:
                raise _failure(endpoint, "search for the study", exc) from exc
        else:
            raise _failure(endpoint, "search for the study", exc) from exc
    series = [
        {
            "uid": _value(item, _SERIES_UID),
            "modality": _value(item, _MODALITY),
            "description": _value(item, _SERIES_DESCRIPTION),
            "number": _value(item, _SERIES_NUMBER),
            "instances": _value(item, _INSTANCES),
        }
        for item in found
        if _value(item, _SERIES_UID)
    ]
    if not series:
        raise DicomWebError(
            "study_not_found",
            f"DICOMweb server {endpoint.name} holds no series of study {study_uid}; check "
            "the StudyInstanceUID",
        )
    return series


def retrieve_study(
    endpoint: DicomWebEndpoint,
    study_uid: str,
    folder: Path,
    *,
    series_uids: Sequence[str] = (),
    max_bytes: int,
    timeout_s: float,
    progress: Callable[[int, int], None] | None = None,
    retries: bool = True,
) -> int:
    """Retrieves the MR series of ``study_uid`` (or only ``series_uids``) with WADO-RS
    into ``folder`` (one file per instance, ``<series>/<n>.dcm``); returns how many
    instances were stored. ``progress`` is called with (series done, series in all).
    Without ``retries`` each request is made once (the caller retries the whole).

    Raises:
        DicomWebError: as :func:`find_study`, or ``too_large`` past ``max_bytes``.
    """
    if series_uids:
        wanted = list(dict.fromkeys(series_uids))
    else:
        wanted = [
            s["uid"]
            for s in find_study(endpoint, study_uid, timeout_s, retries)
            if s["modality"] in RETRIEVED_MODALITIES
        ]
        if not wanted:
            raise DicomWebError(
                "missing_modality",
                f"study {study_uid} on DICOMweb server {endpoint.name} holds no MR series",
            )
    web = client(endpoint, timeout_s, retries)
    total = count = 0
    for n, series_uid in enumerate(wanted):
        target = folder / f"series{n:03d}"
        target.mkdir(parents=True, exist_ok=True)
        try:
            for i, ds in enumerate(web.iter_series(study_uid, series_uid)):
                path = target / f"{i:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                total += path.stat().st_size
                count += 1
                if total > max_bytes:
                    raise DicomWebError(
                        "too_large",
                        f"study {study_uid} is larger than {max_bytes / 2**20:.0f} MB; name "
                        "its four series (series=t1=<uid>,...) to retrieve only those",
                    )
        except _FAILURES as raised:
            exc = _unwrap(raised)
            response = exc.response if isinstance(exc, requests.HTTPError) else None
            if response is not None and response.status_code == 404:
                raise DicomWebError(
                    "series_not_found",
                    f"DICOMweb server {endpoint.name} has no series {series_uid} in study "
                    f"{study_uid}",
                ) from exc
            raise _failure(endpoint, f"send series {series_uid}", exc) from exc
        if progress is not None:
            progress(n + 1, len(wanted))
    logger.info(
        "retrieved %d instances (%.1f MB) of study %s from %s",
        count,
        total / 2**20,
        study_uid,
        endpoint.name,
    )
    return count


def store_files(endpoint: DicomWebEndpoint, paths: Sequence[Path], timeout_s: float) -> int:
    """Stores the DICOM files ``paths`` on ``endpoint`` with one STOW-RS request, made
    once; returns how many instances it accepted.

    Raises:
        DicomWebError: the request failed, or the server refused an instance
            (``dicomweb_store_refused``).
    """
    datasets = [pydicom.dcmread(p) for p in paths]
    web = client(endpoint, timeout_s, retries=False)
    try:
        response = web.store_instances(datasets)
    except _FAILURES as raised:
        exc = _unwrap(raised)
        raise _failure(endpoint, "store the results", exc) from exc
    failed = response.get("FailedSOPSequence") or []
    if failed:
        reasons = ", ".join(
            f"{item.get('ReferencedSOPInstanceUID', '?')}: "
            f"0x{int(item.get('FailureReason', 0)):04X}"
            for item in failed
        )
        raise DicomWebError(
            "dicomweb_store_refused",
            f"DICOMweb server {endpoint.name} refused {len(failed)} of {len(datasets)} "
            f"instances ({reasons})",
        )
    return len(response.get("ReferencedSOPSequence") or []) or len(datasets)


# --------------------------------------------------------------------------- deliveries


def is_store(delivery: Delivery) -> bool:
    """Whether ``delivery`` stores results to a DICOMweb destination."""
    return delivery.event.startswith(STORE_EVENT)


def store_deliveries(
    job_id: str, owner: str, destinations: Mapping[str, DicomWebEndpoint], files: Sequence[str]
) -> list[NewDelivery]:
    """One delivery per destination of the storage keys ``files`` (the job's SEG and
    preview), to record when the job succeeds."""
    body = json.dumps({"files": list(files)}, separators=(",", ":"))
    return [
        NewDelivery(
            id=f"stow_{uuid.uuid4().hex}",
            job_id=job_id,
            owner=owner,
            event=f"{STORE_EVENT}{name}",
            url=endpoint.url,  # shown in the job status: never the credentials
            body=body,
        )
        for name, endpoint in destinations.items()
    ]


def store_attempt(delivery: Delivery, settings: Settings) -> AttemptResult:
    """One attempt at storing a job's results to the destination ``delivery`` names."""
    name = delivery.event[len(STORE_EVENT) :]
    endpoint = settings.dicomweb_destination_endpoints().get(name)
    if endpoint is None:
        return AttemptResult(
            False,
            error=f"DICOMweb destination {name!r} is no longer configured",
            retry=False,
        )
    storage = Storage(settings.storage_dir)
    try:
        paths = [storage.path(key) for key in json.loads(delivery.body)["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        return AttemptResult(False, error=f"unreadable delivery ({exc})", retry=False)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        return AttemptResult(
            False, error=f"the job's results are no longer stored ({missing[0]})", retry=False
        )
    try:
        store_files(endpoint, paths, settings.dicomweb_timeout_s)
    except DicomWebError as exc:
        return AttemptResult(False, error=exc.message[:500])
    return AttemptResult(True, 200)
