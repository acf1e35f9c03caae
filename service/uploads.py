"""Checking uploads before anything is queued.

Three layers: the request body is counted while it streams in (:class:`BodySizeLimit`);
each file's name, gzip stream and declared volume size are checked as it is stored
(:func:`store_upload`); then the volumes are read and checked together with the same
rules as the command line (:func:`model.nifti_io.load_case`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_body

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


class _BodyTooLargeError(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: answers 413 as soon as a request body passes ``max_bytes``.

    A declared Content-Length over the limit is refused before reading; otherwise the
    bytes are counted as they arrive, so an oversized upload is never stored whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        limit_mb = self.max_bytes / 2**20
        body = json.dumps(
            error_body(
                "upload_too_large",
                f"the request is larger than the limit of {limit_mb:.0f} MB; send smaller "
                "files (compressed .nii.gz) or ask the operator to raise OMNET_MAX_UPLOAD_MB",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})

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

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
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


def check_filename(field: str, filename: str | None) -> str:
    """The upload's file name, refused when it is path-like or not NIfTI."""
    name = filename or ""
    if not name:
        raise ApiError(
            400, "bad_filename", f"field '{field}' has no file name; send a .nii.gz file"
        )
    if "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or name.startswith("."):
        raise ApiError(
            400,
            "bad_filename",
            f"field '{field}': file name {name!r} looks like a path; "
            "send a plain name like t1.nii.gz",
        )
    if not (name.lower().endswith(".nii") or name.lower().endswith(".nii.gz")):
        raise ApiError(
            400,
            "not_nifti",
            f"field '{field}': {name!r} is not a NIfTI file; send .nii or .nii.gz volumes",
        )
    return name


def _copy_limited(src: BinaryIO, dest: Path, field: str, max_bytes: int) -> bytes:
    """Copies ``src`` to ``dest``; returns the first bytes (for format checks)."""
    head = b""
    total = 0
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            if not head:
                head = chunk[:352]
            total += len(chunk)
            if total > max_bytes:
                raise ApiError(413, "upload_too_large", f"field '{field}' is larger than the limit")
            out.write(chunk)
    if total == 0:
        raise ApiError(400, "empty_file", f"field '{field}' is an empty file; send the volume")
    return head


def _check_gzip(path: Path, field: str, max_volume: int) -> bytes:
    """Decompresses in a stream with a ceiling (decompression bombs) and checks integrity.

    Returns the first 352 decompressed bytes (the NIfTI-1 header).
    """
    total, head = 0, b""
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                if len(head) < 352:
                    head += chunk[: 352 - len(head)]
                total += len(chunk)
                if total > max_volume:
                    raise ApiError(
                        413,
                        "volume_too_large",
                        f"field '{field}' decompresses to more than "
                        f"{max_volume / 2**20:.0f} MB; this is not a plausible MRI volume",
                    )
    except EOFError as exc:
        raise ApiError(
            400,
            "corrupt_gzip",
            f"field '{field}' is a truncated gzip file; the upload was cut short, send it again",
        ) from exc
    except (OSError, zlib.error) as exc:
        raise ApiError(
            400,
            "corrupt_gzip",
            f"field '{field}' is not a valid gzip stream ({exc}); compress it again and resend",
        ) from exc
    return head


def _check_header(head: bytes, field: str, max_volume: int) -> None:
    """The NIfTI header must parse and declare a volume under the size ceiling."""
    try:
        header = nib.Nifti1Header.from_fileobj(_BytesReader(head), check=True)
    except Exception as exc:  # nibabel raises several types on garbage
        try:
            header = nib.Nifti2Header.from_fileobj(_BytesReader(head + b"\x00" * 540), check=True)
        except Exception:
            raise ApiError(
                400, "not_nifti", f"field '{field}' is not a NIfTI volume ({type(exc).__name__})"
            ) from exc
    shape = header.get_data_shape()
    nbytes = int(np.prod(shape, dtype=np.float64)) * header.get_data_dtype().itemsize
    if nbytes > max_volume:
        raise ApiError(
            413,
            "volume_too_large",
            f"field '{field}' declares a {shape} volume of {nbytes / 2**20:.0f} MB, over the "
            f"limit of {max_volume / 2**20:.0f} MB",
        )


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out = self.data[self.pos : end]
        self.pos = min(end, len(self.data))
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else len(self.data) + pos
        return self.pos

    def tell(self) -> int:
        return self.pos


def store_upload(
    field: str, filename: str | None, src: BinaryIO, folder: Path, max_volume: int
) -> Path:
    """Stores one uploaded volume as ``folder/<field>.nii[.gz]`` after the cheap checks."""
    name = check_filename(field, filename)
    gz = name.lower().endswith(".gz")
    dest = folder / f"{field}.nii.gz" if gz else folder / f"{field}.nii"
    head = _copy_limited(src, dest, field, max_volume * 4)
    if gz:
        if not head.startswith(GZIP_MAGIC):
            raise ApiError(
                400,
                "not_nifti",
                f"field '{field}': {name!r} ends in .gz but is not gzip-compressed; "
                "send a real .nii.gz or rename it .nii",
            )
        head = _check_gzip(dest, field, max_volume)
    _check_header(head, field, max_volume)
    return dest


def parse_bool(field: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, "bad_option", f"option '{field}' must be true or false; got {value!r}")
