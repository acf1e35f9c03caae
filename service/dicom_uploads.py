"""Checking the DICOM parts of a submission before anything is queued.

A job's case comes in one of three ways: NIfTI volumes (:mod:`service.nifti_uploads`), a DICOM
study uploaded as one zip (``study``) or as ``.dcm`` parts (``dicom``, repeated), or a
``study_uid`` that the worker retrieves from the configured DICOMweb source. An
uploaded study is stored and its headers are checked the way the worker will read it
(:func:`model.io.dicom.study.check_dicom_study`: series found, mapped to the four
modalities, geometry safe to convert, pixel data decodable) and its SEG and preview are
built once, in memory, on the T1ce headers (:func:`model.io.dicom.outputs.dicom_output_problems`),
so that a study that cannot work is answered 422 with the reason's code now, not as a
failed job (or a result without its SEG) later. A ``study_uid`` is looked up
on the source (QIDO-RS); its series are mapped by the worker once retrieved.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from starlette.datastructures import UploadFile

from model.io.dicom.classify import (
    DEFAULT_RULES,
    SeriesRule,
    parse_series_overrides,
    parse_series_rules,
)
from model.io.dicom.outputs import dicom_output_problems
from model.io.dicom.study import GRID_MODALITY, check_dicom_study
from model.io.volumes import InputError
from service.config import DicomWebEndpoint, Settings
from service.dicomweb import DicomWebError, find_study
from service.errors import ApiError

CHUNK = 1 << 20
#: Longest wait for the DICOMweb source while a submission is answered (seconds).
SUBMIT_LOOKUP_TIMEOUT_S = 15.0
#: A StudyInstanceUID: digits in dot-separated components, at most 64 characters.
UID_CHARS = frozenset("0123456789.")


def check_uid(field: str, value: str) -> str:
    """A DICOM UID (digits and dots, at most 64 characters), or 400 ``bad_option``."""
    uid = value.strip()
    parts = uid.split(".")
    if (
        not uid
        or len(uid) > 64
        or not set(uid) <= UID_CHARS
        or any(not p or (len(p) > 1 and p[0] == "0") for p in parts)
    ):
        raise ApiError(
            400,
            "bad_option",
            f"option '{field}' must be a DICOM UID (digits and dots, e.g. 1.2.840.113619...); "
            f"got {value[:80]!r}",
        )
    return uid


def parse_series(value: str) -> str:
    """The ``series`` option, checked and normalised (``t1ce=UID,flair=UID``)."""
    try:
        overrides = parse_series_overrides(i for i in value.split(",") if i.strip())
    except ValueError as exc:
        raise ApiError(400, "bad_option", f"option 'series': {exc}") from exc
    return ",".join(f"{m}={uid}" for m, uid in overrides.items())


def series_overrides(options: Mapping[str, object]) -> dict[str, str]:
    """The modality -> series overrides of a job's options."""
    value = options.get("series")
    return parse_series_overrides(str(value).split(",")) if value else {}


def series_rules(settings: Settings) -> tuple[SeriesRule, ...]:
    """The site's series rules (``OMNET_DICOM_SERIES_RULES``), then the built-in ones."""
    return (*parse_series_rules(settings.dicom_series_rules), *DEFAULT_RULES)


def parse_destinations(value: str, configured: Mapping[str, DicomWebEndpoint]) -> str:
    """The ``destinations`` option: names of configured DICOMweb destinations."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in configured]
    if unknown:
        known = ", ".join(configured) or "none is configured"
        raise ApiError(
            400,
            "unknown_destination",
            f"no DICOMweb destination {unknown[0]!r}; the destinations are: {known}",
        )
    return ",".join(dict.fromkeys(names))


def job_destinations(
    options: Mapping[str, object], settings: Settings
) -> dict[str, DicomWebEndpoint]:
    """The destinations a DICOM job's results go to: those it named (None: all)."""
    configured = settings.dicomweb_destination_endpoints()
    named = options.get("destinations")
    if named is None:
        return configured
    wanted = [n for n in str(named).split(",") if n]
    return {n: configured[n] for n in wanted if n in configured}


def _copy(src: UploadFile, dest: Path, field: str, max_bytes: int, total: int) -> tuple[int, str]:
    """Copies an upload to ``dest``; returns the running total of bytes stored and the
    upload's SHA-256, taken as it is copied."""
    size = 0
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        while chunk := src.file.read(CHUNK):
            size += len(chunk)
            if total + size > max_bytes:
                raise ApiError(
                    413,
                    "upload_too_large",
                    f"the DICOM study is larger than {max_bytes / 2**20:.0f} MB",
                )
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise ApiError(400, "empty_file", f"a '{field}' part is an empty file")
    return total + size, digest.hexdigest()


def store_dicom(
    study: UploadFile | None,
    parts: list[UploadFile],
    staging: Path,
    max_bytes: int,
    overrides: Mapping[str, str],
    rules: Sequence[SeriesRule] = DEFAULT_RULES,
    digests: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Stores an uploaded study (a zip, or ``.dcm`` parts into one folder) in
    ``staging`` and checks its headers; returns ``{"study": zip}`` or ``{"dicom":
    folder}``. ``digests`` gets the SHA-256 of the zip, or of the parts' SHA-256s in
    sorted order (the same parts in any order are the same study)."""
    digests = {} if digests is None else digests
    if study is not None:
        path = staging / "study.zip"
        digests["study"] = _copy(study, path, "study", max_bytes, 0)[1]
        if not zipfile.is_zipfile(path):
            raise ApiError(
                400,
                "not_zip",
                "field 'study' is not a zip file; zip the folder that holds the study's "
                "series (or send its files as repeated 'dicom' parts)",
            )
        stored = {"study": path}
    else:
        path = staging / "dicom"
        path.mkdir()
        total = 0
        each = []
        for n, part in enumerate(parts):
            total, sha256 = _copy(part, path / f"{n:05d}.dcm", "dicom", max_bytes, total)
            each.append(sha256)
        digests["dicom"] = hashlib.sha256("\n".join(sorted(each)).encode()).hexdigest()
        stored = {"dicom": path}
    try:
        layout = check_dicom_study(path, rules=rules, overrides=overrides, max_bytes=max_bytes)
    except InputError as exc:
        message = str(exc).replace(f"{staging}/", "").replace(str(staging), "the upload")
        raise ApiError(422, exc.code, message) from exc
    grid = layout.stacks[GRID_MODALITY]
    problems = dicom_output_problems(grid.reference, grid.frames)
    if problems:
        raise ApiError(
            422,
            "unsupported_series",
            f"{'; '.join(problems)} from the T1ce {layout.series[GRID_MODALITY].label()}, "
            "so the study was not queued. Send it with the missing attributes filled in",
        )
    return stored


def check_study_on_source(settings: Settings, study_uid: str, overrides: Mapping[str, str]) -> None:
    """The source must hold ``study_uid`` (and the series the overrides name)."""
    endpoint = settings.dicomweb_source_endpoint()
    if endpoint is None:
        raise ApiError(
            400,
            "dicomweb_not_configured",
            "this service has no DICOMweb source (OMNET_DICOMWEB_SOURCE), so it cannot "
            "retrieve studies by study_uid; upload the study instead",
        )
    try:
        # The caller is waiting: one attempt, bounded more tightly than a worker's.
        timeout_s = min(settings.dicomweb_timeout_s, SUBMIT_LOOKUP_TIMEOUT_S)
        series = find_study(endpoint, study_uid, timeout_s, retries=False)
    except DicomWebError as exc:
        status = 422 if exc.code == "study_not_found" else 503
        raise ApiError(status, exc.code, exc.message) from exc
    found = {s["uid"] for s in series} | {str(s["number"]) for s in series if s["number"]}
    for modality, uid in overrides.items():
        if uid not in found:
            raise ApiError(
                422,
                "series_not_found",
                f"study {study_uid} has no series {uid} (given for {modality}); its series: "
                + "; ".join(
                    f"{s['uid']} #{s['number']} {s['modality']} {s['description'] or ''}".strip()
                    for s in series
                ),
            )
