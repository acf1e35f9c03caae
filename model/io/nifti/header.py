"""Reading a NIfTI header, extensions included, from the start of a byte stream.

The service checks each uploaded volume's header while the upload is still compressed
on disk, before any voxel is read; the command line opens files with ``nibabel.load``.
Both must agree on what a NIfTI header is, so this module hands the whole header - the
fixed block and every extension up to the voxel data - to nibabel's own parser, as
``nibabel.load`` does, instead of a fixed number of leading bytes (real files carry
extensions: the BraTS 2018 release has a 2.5 kB AFNI XML one in most files).

Only the header is read: at most :data:`MAX_HEADER_BYTES`, whatever the file declares.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import nibabel as nib
import numpy as np

#: The largest header (fixed block and extensions, i.e. the voxel data offset) read.
#: Real extensions are a few kilobytes; a larger offset is refused, not read.
MAX_HEADER_BYTES = 16 << 20

#: sizeof_hdr of each NIfTI version, the first four bytes of a header.
_VERSIONS: dict[int, type[nib.Nifti1Header]] = {
    348: nib.Nifti1Header,
    540: nib.Nifti2Header,
}


class NiftiHeaderError(ValueError):
    """The bytes are not a usable NIfTI header; the message says why, in plain words."""


@dataclass(frozen=True)
class HeaderInfo:
    """What the header declares about the voxel data that follows it."""

    header: nib.Nifti1Header
    version: int  # 1 or 2
    data_offset: int  # bytes before the voxel data
    data_bytes: int  # bytes of voxel data the shape and type declare

    @property
    def file_bytes(self) -> int:
        """The size of the whole (uncompressed) file the header implies."""
        return self.data_offset + self.data_bytes


def _read(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _version(first: bytes) -> type[nib.Nifti1Header]:
    for order in ("little", "big"):
        klass = _VERSIONS.get(int.from_bytes(first, order))  # type: ignore[arg-type]
        if klass is not None:
            return klass
    raise NiftiHeaderError(
        "it does not start with a NIfTI header (the first four bytes must give the header "
        "size, 348 for NIfTI-1 or 540 for NIfTI-2)"
    )


def read_nifti_header(stream: BinaryIO, max_header_bytes: int = MAX_HEADER_BYTES) -> HeaderInfo:
    """Reads and parses the header at the start of ``stream`` (a single-file NIfTI-1 or
    NIfTI-2 volume, uncompressed bytes), leaving the stream at the voxel data.

    Raises:
        NiftiHeaderError: not NIfTI, a two-file (.hdr/.img) header, a header cut short,
            extensions that do not parse or are larger than ``max_header_bytes``.
    """
    first = _read(stream, 4)
    if len(first) < 4:
        raise NiftiHeaderError("it is shorter than a NIfTI header")
    klass = _version(first)
    fixed = first + _read(stream, klass.template_dtype.itemsize - 4)
    if len(fixed) < klass.template_dtype.itemsize:
        raise NiftiHeaderError("its NIfTI header is cut short; the file is truncated")
    block = klass(binaryblock=fixed, check=False)
    magic = bytes(block["magic"]).rstrip(b"\x00")
    if magic in (b"ni1", b"ni2"):
        raise NiftiHeaderError(
            "it is the header of a two-file NIfTI pair (.hdr/.img); convert the pair to one "
            ".nii.gz file (for example nibabel.save(nibabel.load('x.hdr'), 'x.nii.gz'))"
        )
    offset = float(block["vox_offset"])
    if not np.isfinite(offset) or offset > max_header_bytes:
        raise NiftiHeaderError(
            f"its header declares {offset:.0f} bytes before the voxel data, more than the "
            f"{max_header_bytes >> 20} MB a NIfTI header and its extensions may take here"
        )
    size = max(int(offset), len(fixed))
    rest = _read(stream, size - len(fixed))
    if len(rest) < size - len(fixed):
        raise NiftiHeaderError("its header extensions are cut short; the file is truncated")
    raw = io.BytesIO(fixed + rest)
    try:
        header = klass.from_fileobj(raw, check=True)
    except Exception as exc:  # nibabel raises HeaderDataError, WrapStructError, ...
        raise NiftiHeaderError(f"its NIfTI header is invalid: {exc}") from exc
    try:
        dtype = header.get_data_dtype()
        shape = header.get_data_shape()
    except Exception as exc:  # an unknown datatype code
        raise NiftiHeaderError(f"its NIfTI header is invalid: {exc}") from exc
    data_bytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    return HeaderInfo(header, 2 if klass is nib.Nifti2Header else 1, size, data_bytes)
