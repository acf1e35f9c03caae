"""Staging and checking uploaded NIfTI volumes, before anything is queued.

Each file of a submission is checked as it is stored (:func:`store_upload`): its name,
its compressed stream (gzip or bzip2, decompressed in a stream against a size ceiling,
so that a decompression bomb stops early) and the volume size its header declares; its
SHA-256 is taken as it is copied (for the submission's fingerprint,
:mod:`service.idempotency`).
:func:`store_case` then reads the volumes of a case together with the command line's
rules (:func:`model.io.nifti.check.check_case`, which reads the voxels in slabs). The
form around the files is read by :mod:`service.uploads`; DICOM studies are checked by
:mod:`service.dicom_uploads`.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from starlette.datastructures import UploadFile

from model.io.nifti.check import check_case, check_labels
from model.io.nifti.header import HeaderInfo, NiftiHeaderError, read_nifti_header
from model.io.volumes import MODALITIES, InputError
from service.errors import ApiError

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
#: Leading bytes of an upload kept for its format check (compression magic numbers).
HEADER_BYTES = 352
#: What a compressed upload may hold beyond the voxel data its header declares
#: (header extensions, padding); more is not a NIfTI volume, but a bomb or garbage.
TRAILING_SLACK = 1 << 20


@dataclass(frozen=True)
class _Compression:
    """A compressed NIfTI ending: its magic bytes, opener and error code."""

    ending: str
    magic: bytes
    name: str
    code: str
    open: Any


COMPRESSIONS = (
    _Compression(".nii.gz", GZIP_MAGIC, "gzip", "corrupt_gzip", gzip.open),
    _Compression(".nii.bz2", b"BZh", "bzip2", "corrupt_bzip2", bz2.open),
)
#: File endings accepted for uploaded volumes.
NIFTI_ENDINGS = (".nii", *(c.ending for c in COMPRESSIONS))


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
    if name.lower().endswith((".hdr", ".img", ".hdr.gz", ".img.gz")):
        raise ApiError(
            400,
            "not_nifti",
            f"field '{field}': {name!r} is half of a two-file NIfTI/Analyze pair (.hdr/.img); "
            "convert the pair to one .nii.gz file (for example nibabel.save(nibabel.load("
            "'x.hdr'), 'x.nii.gz')) and send that",
        )
    if not name.lower().endswith(NIFTI_ENDINGS):
        raise ApiError(
            400,
            "not_nifti",
            f"field '{field}': {name!r} is not a NIfTI file; send .nii, .nii.gz or .nii.bz2 "
            "volumes",
        )
    return name


def _copy_limited(src: BinaryIO, dest: Path, field: str, max_bytes: int) -> tuple[bytes, str]:
    """Copies ``src`` to ``dest``; returns the first bytes (for format checks) and the
    SHA-256 of the whole, taken as it is copied."""
    head = b""
    total = 0
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        while chunk := src.read(CHUNK):
            if not head:
                head = chunk[:HEADER_BYTES]
            total += len(chunk)
            if total > max_bytes:
                raise ApiError(413, "upload_too_large", f"field '{field}' is larger than the limit")
            digest.update(chunk)
            out.write(chunk)
    if total == 0:
        raise ApiError(400, "empty_file", f"field '{field}' is an empty file; send the volume")
    return head, digest.hexdigest()


def _too_large(field: str, what: str, limit: int) -> ApiError:
    return ApiError(
        413,
        "volume_too_large",
        f"field '{field}' {what} more than {limit / 2**20:.0f} MB; this is not a plausible "
        "MRI volume",
    )


def _check_compressed(path: Path, field: str, max_volume: int, kind: _Compression) -> None:
    """Decompresses in a stream, checking integrity, the header and a size ceiling.

    The ceiling is the volume its header declares (plus :data:`TRAILING_SLACK`), capped
    by ``max_volume``: a decompression bomb is stopped after its header and the declared
    size, not after ``max_volume`` bytes.
    """
    try:
        with kind.open(path, "rb") as fh:
            try:
                info = _check_header(fh, field, max_volume)
            except ApiError:
                # Garbage where the header should be: a corrupt stream is the likelier
                # cause when the next block (up to 1 MB, enough for a bzip2 block)
                # fails its check; otherwise it is not NIfTI. Either way, stop early.
                fh.read(TRAILING_SLACK)
                raise
            ceiling = min(max_volume, info.file_bytes + TRAILING_SLACK)
            total = info.data_offset
            while chunk := fh.read(CHUNK):
                total += len(chunk)
                if total > ceiling:
                    if ceiling == max_volume:
                        raise _too_large(field, "decompresses to", max_volume)
                    raise ApiError(
                        400,
                        "not_nifti",
                        f"field '{field}' decompresses to more data than its NIfTI header "
                        f"declares ({ceiling / 2**20:.1f} MB); it is not a NIfTI volume",
                    )
    except EOFError as exc:
        raise ApiError(
            400,
            kind.code,
            f"field '{field}' is a truncated {kind.name} file; the upload was cut short, "
            "send it again",
        ) from exc
    except (OSError, ValueError, zlib.error) as exc:
        raise ApiError(
            400,
            kind.code,
            f"field '{field}' is not a valid {kind.name} stream ({exc}); compress it again "
            "and resend",
        ) from exc


def _check_header(stream: BinaryIO, field: str, max_volume: int) -> HeaderInfo:
    """The NIfTI header, extensions included, must parse as ``nibabel.load`` parses it
    and declare a volume under the size ceiling; reads the header only."""
    try:
        info = read_nifti_header(stream)
    except NiftiHeaderError as exc:
        raise ApiError(
            400,
            "not_nifti",
            f"field '{field}' is not a NIfTI volume: {exc}. Send a NIfTI-1 or NIfTI-2 volume "
            "(.nii, .nii.gz or .nii.bz2)",
        ) from exc
    if info.data_bytes > max_volume:
        shape = info.header.get_data_shape()
        raise ApiError(
            413,
            "volume_too_large",
            f"field '{field}' declares a {shape} volume of {info.data_bytes / 2**20:.0f} MB, "
            f"over the limit of {max_volume / 2**20:.0f} MB",
        )
    return info


def store_upload(
    field: str,
    filename: str | None,
    src: BinaryIO,
    folder: Path,
    max_volume: int,
    digests: dict[str, str] | None = None,
) -> Path:
    """Stores one uploaded volume as ``folder/<field>.nii[.gz|.bz2]`` after the cheap
    checks (name, compression, header, sizes); ``digests[field]`` gets the SHA-256 of
    the file as sent."""
    name = check_filename(field, filename)
    kind = next((c for c in COMPRESSIONS if name.lower().endswith(c.ending)), None)
    dest = folder / f"{field}{kind.ending if kind else '.nii'}"
    head, sha256 = _copy_limited(src, dest, field, max_volume * 4)
    if digests is not None:
        digests[field] = sha256
    if kind is None:
        with open(dest, "rb") as fh:
            _check_header(fh, field, max_volume)
        return dest
    if not head.startswith(kind.magic):
        raise ApiError(
            400,
            "not_nifti",
            f"field '{field}': {name!r} ends in {kind.ending} but is not {kind.name}-compressed; "
            f"send a real {kind.ending} or rename it .nii",
        )
    _check_compressed(dest, field, max_volume, kind)
    return dest


def store_case(
    files: dict[str, UploadFile],
    staging: Path,
    max_volume: int,
    digests: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Stores each upload in ``staging`` after its cheap checks, then reads and checks the
    volumes together; returns the stored files by field name (``digests`` gets their
    SHA-256s by field name)."""
    paths = {
        name: store_upload(name, upload.filename, upload.file, staging, max_volume, digests)
        for name, upload in files.items()
    }
    try:  # the command line's rules, the voxels read in slabs (never a whole volume)
        if "image" in paths:
            layout = check_case(paths["image"])
        else:
            layout = check_case({m: paths[m] for m in MODALITIES})
        if "reference" in paths:
            check_labels(paths["reference"], like=layout)
    except InputError as exc:
        message = str(exc).replace(f"{staging}/", "")
        raise ApiError(422, exc.code, message) from exc
    return paths
