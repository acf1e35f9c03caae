"""Receiving a job submission: the request body, its form and its options.

Layers, in the order a submission meets them: the request body is counted while it
streams in (:class:`BodySizeLimit`); the multipart form's fields are sorted into files
and options (:func:`read_form`, :func:`split_fields`, :func:`parse_options`,
:func:`check_inputs`); then the case's files are staged and checked, NIfTI volumes by
:mod:`service.nifti_uploads` (each file as it is stored, then the volumes together with
the command line's rules) and DICOM studies by :mod:`service.dicom_uploads`.
:func:`receive_case` runs them all for a submission.
"""

from __future__ import annotations

import asyncio
import email.message
import email.utils
import json
import shutil
import uuid
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.io.volumes import MODALITIES
from service.config import DicomWebEndpoint, Settings
from service.dicom_uploads import (
    check_study_on_source,
    check_uid,
    parse_destinations,
    parse_series,
    series_overrides,
    series_rules,
    store_dicom,
)
from service.errors import ApiError, error_body
from service.idempotency import submission_sha256
from service.nifti_uploads import store_case
from service.schemas import JobOptions
from service.storage import Storage
from service.webhooks import CallbackRefusedError, CallbackRules

#: Form fields that carry files: the four modalities, or one 4D image, and a reference;
#: or a DICOM study as one zip ('study') or as its files ('dicom', repeated).
FILE_FIELDS = (*MODALITIES, "image", "reference", "study", "dicom")
#: The file fields of NIfTI input.
NIFTI_FIELDS = (*MODALITIES, "image", "reference")
#: Most 'dicom' parts in one submission (a larger study is sent as one 'study' zip).
MAX_DICOM_PARTS = 5000
#: Form fields that carry job options.
OPTION_FIELDS = tuple(JobOptions.model_fields)


class _BodyTooLargeError(Exception):
    pass


class _BodyStalledError(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: answers 413 as soon as a request body passes ``max_bytes``, and
    408 when a body stops arriving for ``idle_timeout_s``.

    A declared Content-Length over the limit is refused before reading; otherwise the
    bytes are counted as they arrive, so an oversized upload is never stored whole. A
    client that declares a body and then stalls is answered and disconnected instead
    of holding a connection (and an upload in staging) for ever.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s

    async def _reject(self, send: Send) -> None:
        limit_mb = self.max_bytes / 2**20
        await _send_error(
            send,
            413,
            "upload_too_large",
            f"the request is larger than the limit of {limit_mb:.0f} MB; send smaller "
            "files (compressed .nii.gz) or ask the operator to raise OMNET_MAX_UPLOAD_MB",
        )

    async def _stalled(self, send: Send) -> None:
        await _send_error(
            send,
            408,
            "upload_stalled",
            f"no part of the request body arrived for {self.idle_timeout_s:.0f} s; nothing "
            "was queued, send it again",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        received = 0
        started = False

        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # only a disconnect can come now; no time limit on waiting
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except TimeoutError:
                raise _BodyStalledError from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise _BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:
            if not started:
                await self._reject(send)
        except _BodyStalledError:
            if not started:
                await self._stalled(send)


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    """A JSON error response that also closes the connection."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send(
        {"type": "http.response.body", "body": json.dumps(error_body(code, message)).encode()}
    )


# ------------------------------------------------------------------ the form
def extended_filename(disposition: bytes | None) -> str | None:
    """The file name of a part's Content-Disposition that gives it only in the RFC 2231 /
    RFC 5987 form (``filename*=UTF-8''t1.nii.gz``, or continued as ``filename*0*=...``),
    decoded; None when the header has a plain ``filename=`` or no file name at all."""
    if not disposition:
        return None
    _, plain = parse_options_header(disposition)
    if b"filename" in plain:
        return None
    header = email.message.Message()
    header["content-disposition"] = disposition.decode("latin-1")
    value = header.get_param("filename", header="content-disposition")
    if value is None:
        return None
    return email.utils.collapse_rfc2231_value(value)


class SubmissionParser(MultiPartParser):
    """Starlette's streaming multipart parser, with what a submission needs on top.

    - A part named as a file only by ``filename*`` (RFC 2231 / RFC 5987, which
      python-multipart ignores) is a file upload of that name, not a text field.
    - :attr:`complete` tells whether the body reached its closing boundary: the parser
      accepts a body that simply stops, and drops the part it was in the middle of.
    """

    complete = False

    def on_headers_finished(self) -> None:
        part = self._current_part
        name = extended_filename(part.content_disposition)
        if name is not None and part.content_disposition is not None:
            # Starlette makes a part a file when it sees a plain filename; an empty
            # one, replaced below by the real name (which then needs no re-quoting).
            part.content_disposition += b'; filename=""'
        super().on_headers_finished()
        if name is not None and part.file is not None:
            part.file.filename = name

    def on_end(self) -> None:
        self.complete = True


async def read_form(request: Request) -> FormData:
    """The request's multipart form, with no more fields than a submission has."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(
            415,
            "not_multipart",
            "send the files as multipart/form-data (curl -F t1=@t1.nii.gz ...)",
        )
    try:
        async with aclosing(request.stream()) as stream:
            parser = SubmissionParser(
                request.headers,
                stream,
                max_files=len(FILE_FIELDS) + MAX_DICOM_PARTS,
                max_fields=len(OPTION_FIELDS) + 2,
            )
            form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(
            400, "bad_multipart", f"the multipart body cannot be read: {exc.message}"
        ) from exc
    except ClientDisconnect as exc:
        raise ApiError(
            400,
            "upload_incomplete",
            "the connection closed before the whole upload arrived; nothing was queued, "
            "send it again",
        ) from exc
    if not parser.complete:
        await form.close()
        raise ApiError(
            400,
            "upload_incomplete",
            "the request body ended before the multipart closing boundary (--BOUNDARY--): "
            "the upload was cut short; nothing was queued, send the whole request again",
        )
    return form


@dataclass
class Fields:
    """A submission form sorted: files by field name, the ``dicom`` parts, options."""

    files: dict[str, UploadFile]
    dicom: list[UploadFile]
    values: dict[str, str]


def split_fields(form: FormData) -> Fields:
    """The form's files and option values by field name; unknown, repeated (but for
    ``dicom``) or misplaced fields are refused."""
    fields = Fields({}, [], {})
    for name, value in form.multi_items():
        if name not in FILE_FIELDS and name not in OPTION_FIELDS:
            raise ApiError(
                400,
                "unknown_option",
                f"unknown field {name!r}; files: {', '.join(FILE_FIELDS)}; "
                f"options: {', '.join(OPTION_FIELDS)}",
            )
        if name == "dicom" and isinstance(value, UploadFile):
            fields.dicom.append(value)
            continue
        if name in fields.files or name in fields.values:
            raise ApiError(400, "duplicate_field", f"field {name!r} was sent twice")
        if isinstance(value, UploadFile):
            if name not in FILE_FIELDS:
                raise ApiError(400, "bad_option", f"option {name!r} must be a value, not a file")
            fields.files[name] = value
        else:
            if name not in OPTION_FIELDS:
                raise ApiError(400, "missing_file", f"field {name!r} must be a file upload")
            fields.values[name] = value
    return fields


def parse_bool(field: str, value: Any) -> bool:
    """An option's form value as a boolean (true/false, 1/0, yes/no, on/off)."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, "bad_option", f"option '{field}' must be true or false; got {value!r}")


def parse_options(
    values: dict[str, str],
    callbacks: CallbackRules | None = None,
    destinations: Mapping[str, DicomWebEndpoint] | None = None,
) -> JobOptions:
    """The job options from their form values (defaults for those not sent); a
    ``callback_url`` must pass ``callbacks`` (none: webhooks are not offered), named
    ``destinations`` must be among those configured."""
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        if name == "callback_url":
            if callbacks is None:
                raise ApiError(400, "webhooks_not_configured", "this service sends no webhooks")
            try:
                parsed[name] = callbacks.check(value)
            except CallbackRefusedError as exc:
                raise ApiError(400, exc.code, exc.message) from exc
        elif name == "label_convention":
            if value.strip() not in ("3", "4"):
                raise ApiError(
                    400, "bad_option", f"option 'label_convention' must be 4 or 3; got {value!r}"
                )
            parsed[name] = int(value)
        elif name == "study_uid":
            parsed[name] = check_uid(name, value)
        elif name == "series":
            parsed[name] = parse_series(value)
        elif name == "destinations":
            parsed[name] = parse_destinations(value, destinations or {})
        else:
            parsed[name] = parse_bool(name, value)
    return JobOptions(**parsed)


class InputKind(StrEnum):
    """How a submission sends its case."""

    NIFTI = "nifti"
    DICOM = "dicom"  # an uploaded study
    STUDY_UID = "study_uid"  # a study the worker retrieves


def check_inputs(fields: Fields, options: JobOptions) -> InputKind:
    """The files must be one 4D 'image' or the four modalities (a reference is
    optional), or one DICOM study (a 'study' zip, 'dicom' parts, or a 'study_uid')."""
    files = fields.files
    nifti = [n for n in NIFTI_FIELDS if n in files]
    dicom = [n for n in ("study",) if n in files] + (["dicom"] if fields.dicom else [])
    dicom += ["study_uid"] if options.study_uid else []
    if dicom:
        if nifti or len(dicom) > 1:
            raise ApiError(
                400,
                "conflicting_inputs",
                "send one case: NIfTI volumes, or a DICOM study as one 'study' zip, as "
                f"'dicom' files or as a 'study_uid'; got {', '.join(nifti + dicom)}",
            )
        return InputKind.STUDY_UID if options.study_uid else InputKind.DICOM
    if options.series or options.destinations:
        raise ApiError(
            400,
            "conflicting_inputs",
            "options 'series' and 'destinations' apply to DICOM input only",
        )
    if "image" in files:
        extra = [m for m in MODALITIES if m in files]
        if extra:
            raise ApiError(
                400,
                "conflicting_inputs",
                f"send either one 4D 'image' or the four modalities, not both (also got {extra})",
            )
        return InputKind.NIFTI
    missing = [m for m in MODALITIES if m not in files]
    if missing:
        raise ApiError(
            400,
            "missing_modality",
            f"missing {', '.join(missing)}: send the four modalities as files t1, t1ce, t2 and "
            "flair (or one 4D file as 'image', modalities in that order), or a DICOM study "
            "('study' zip, 'dicom' files or 'study_uid')",
        )
    return InputKind.NIFTI


# ------------------------------------------------------------------ a submitted case
@dataclass(frozen=True)
class Submission:
    """A checked case, stored as the inputs of a new job id (no record exists yet)."""

    job_id: str
    inputs: dict[str, str]  # storage keys by field name
    options: JobOptions
    #: The submission's fingerprint (:func:`service.idempotency.submission_sha256`).
    sha256: str


async def receive_case(
    request: Request,
    storage: Storage,
    settings: Settings,
    callbacks: CallbackRules | None = None,
) -> Submission:
    """Reads, checks and stores the case of a job submission.

    Raises :class:`~service.errors.ApiError` when anything is wrong; nothing is left in
    storage then. ``callbacks`` checks a ``callback_url``.
    """
    form = await read_form(request)
    try:
        fields = split_fields(form)
        destinations = settings.dicomweb_destination_endpoints()
        options = parse_options(fields.values, callbacks, destinations)
        kind = check_inputs(fields, options)
        overrides = series_overrides(options.model_dump())
        if kind == InputKind.STUDY_UID:
            assert options.study_uid is not None
            await run_in_threadpool(check_study_on_source, settings, options.study_uid, overrides)
            job_id = str(uuid.uuid4())
            return Submission(job_id, {}, options, submission_sha256(options.model_dump(), {}))
        staging = storage.staging_dir()
        digests: dict[str, str] = {}  # taken as the files are copied into staging
        try:
            if kind == InputKind.DICOM:
                paths = await run_in_threadpool(
                    store_dicom,
                    fields.files.get("study"),
                    fields.dicom,
                    staging,
                    int(settings.max_study_mb * 2**20),
                    overrides,
                    series_rules(settings),
                    digests,
                )
            else:
                max_volume = int(settings.max_volume_mb * 2**20)
                paths = await run_in_threadpool(
                    store_case, fields.files, staging, max_volume, digests
                )
            job_id = str(uuid.uuid4())
            storage.adopt(staging, job_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        await form.close()
    inputs = {name: storage.key(storage.inputs_dir(job_id) / p.name) for name, p in paths.items()}
    return Submission(job_id, inputs, options, submission_sha256(options.model_dump(), digests))
