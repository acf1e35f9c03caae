"""A conformance corpus of NIfTI files, written at test time from one real BraTS case.

Each :class:`Variant` stores the same case (cropped around its tumour so that a model
runs on it in a second) in one of the forms real archives, scanners and converters
produce: header extensions, scaling, qform/sform layouts, NIfTI-2, compression, byte
order, every voxel type nibabel writes here (it refuses float128), extra singleton axes,
label maps stored as floats. A variant either segments to the plain case's labels
(``expect = "same"``; or ``"close"`` where the voxel type cannot hold the intensities
exactly) or is refused with a stable code (``expect`` is that code) by the command
line and the API alike.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from model.io.nifti.files import find_case_files, find_label_file
from model.io.volumes import MODALITIES

#: Crop margin around the tumour's bounding box, in voxels.
MARGIN = 6
#: Largest crop per axis (a small grid keeps inference to about a second).
MAX_EXTENT = (56, 56, 32)

AFNI_XML = (
    b'<?xml version="1.0" ?>\n<AFNI_attributes self_idcode="XYZ_conformance" '
    b'NIfTI_nums="72,72,40,1,1,4" ni_form="ni_group">\n'
    + b'<AFNI_atr ni_type="String" ni_dimen="1" atr_name="HISTORY_NOTE">\n'
    + b'"3dcalc -a t1.nii -expr a"\n</AFNI_atr>\n' * 40
    + b"</AFNI_attributes>\n"
)


@dataclass(frozen=True)
class CroppedCase:
    """The real case on a small grid: images by modality, labels, affine, headers."""

    name: str
    images: dict[str, np.ndarray]  # int16 by modality
    labels: np.ndarray  # uint8, 0/1/2/4
    affine: np.ndarray
    headers: dict[str, nib.Nifti1Header]  # the source files' headers (extensions kept)


def crop_real_case(case_dir: Path) -> CroppedCase:
    files = find_case_files(case_dir)
    label_file = find_label_file(case_dir)
    assert label_file is not None, f"{case_dir} has no label map"
    labels = np.asarray(nib.load(label_file).dataobj).astype(np.uint8)
    tumour = np.argwhere(labels > 0)
    low, high = tumour.min(0), tumour.max(0) + 1
    centre = (low + high) // 2
    box = []
    for axis in range(3):
        extent = min(MAX_EXTENT[axis], int(high[axis] - low[axis]) + 2 * MARGIN)
        start = int(np.clip(centre[axis] - extent // 2, 0, labels.shape[axis] - extent))
        box.append(slice(start, start + extent))
    source_affine = nib.load(files["t1"]).affine
    shift = np.array([s.start for s in box] + [1.0])
    affine = source_affine.copy()
    affine[:, 3] = source_affine @ shift
    images, headers = {}, {}
    for m in MODALITIES:
        img = nib.load(files[m])
        images[m] = np.asarray(img.dataobj)[tuple(box)].astype(np.int16)
        headers[m] = img.header
    return CroppedCase(case_dir.name, images, labels[tuple(box)], affine, headers)


def _header(case: CroppedCase, modality: str, klass: type = nib.Nifti1Header) -> nib.Nifti1Header:
    header = klass()
    for ext in case.headers[modality].extensions:
        header.extensions.append(ext)
    return header


Writer = Callable[[CroppedCase, str, np.ndarray, Path], Path]


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, path)
    return path


def _plain(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
    return _save(nib.Nifti1Image(data, case.affine, _header(case, m)), Path(f"{stem}.nii.gz"))


def _with_extensions(*extensions: tuple[int, bytes]) -> Writer:
    def write(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
        header = nib.Nifti1Header()
        for code, content in extensions:
            header.extensions.append(nib.nifti1.Nifti1Extension(code, content))
        return _save(nib.Nifti1Image(data, case.affine, header), Path(f"{stem}.nii.gz"))

    return write


def _scaled(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
    """Stored values s with s * 0.5 + 100 == data exactly (scl_slope, scl_inter set)."""
    stored = ((data.astype(np.int32) - 100) * 2).astype(np.int32)
    raw = Path(f"{stem}.raw.nii")
    nib.save(nib.Nifti1Image(stored, case.affine, _header(case, m)), raw)
    body = bytearray(raw.read_bytes())
    raw.unlink()
    header = nib.Nifti1Header(binaryblock=bytes(body[:348]))
    header["scl_slope"] = 0.5  # nibabel would recompute these on save: set them in place
    header["scl_inter"] = 100.0
    body[:348] = header.binaryblock
    path = Path(f"{stem}.nii.gz")
    path.write_bytes(gzip.compress(bytes(body), compresslevel=1))
    assert np.array_equal(np.asarray(nib.load(path).dataobj), data), "scaling is not exact"
    return path


def _forms(qform: bool, sform: bool, disagree: bool = False) -> Writer:
    def write(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
        img = nib.Nifti1Image(data, case.affine, _header(case, m))
        if disagree:  # the qform a few mm off: nibabel, like FSL, uses the sform
            shifted = case.affine.copy()
            shifted[:3, 3] += 7.5
            img.set_qform(shifted, code=1)
            img.set_sform(case.affine, code=2)
        else:
            img.set_qform(case.affine if qform else None, code=1 if qform else 0)
            img.set_sform(case.affine if sform else None, code=2 if sform else 0)
        return _save(img, Path(f"{stem}.nii.gz"))

    return write


def _nifti2(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
    header = _header(case, m, nib.Nifti2Header)
    return _save(nib.Nifti2Image(data, case.affine, header), Path(f"{stem}.nii.gz"))


def _ending(ending: str) -> Writer:
    def write(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
        return _save(nib.Nifti1Image(data, case.affine, _header(case, m)), Path(f"{stem}{ending}"))

    return write


def _big_endian(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
    header = nib.Nifti1Header(endianness=">")
    img = nib.Nifti1Image(data.astype(">i2"), case.affine, header)
    path = _save(img, Path(f"{stem}.nii.gz"))
    assert nib.load(path).header.endianness == ">"
    return path


def _dtype(dtype: str) -> Writer:
    def write(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
        img = nib.Nifti1Image(data.astype(np.float64), case.affine, _header(case, m))
        img.header.set_data_dtype(np.dtype(dtype))
        if np.dtype(dtype).kind == "f" or np.iinfo(np.dtype(dtype)).max >= data.max():
            img = nib.Nifti1Image(data.astype(dtype), case.affine, _header(case, m))
            img.header.set_slope_inter(np.nan, np.nan)
        return _save(img, Path(f"{stem}.nii.gz"))

    return write


def _extra_axes(*axes: int) -> Writer:
    def write(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
        shaped = data.reshape(data.shape + axes)
        return _save(nib.Nifti1Image(shaped, case.affine), Path(f"{stem}.nii.gz"))

    return write


def _pair(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
    img = nib.Nifti1Pair(data, case.affine)
    nib.save(img, Path(f"{stem}.img"))
    return Path(f"{stem}.hdr")


def _label_writer(dtype: str) -> Writer:
    def write(case: CroppedCase, m: str, data: np.ndarray, stem: Path) -> Path:
        img = nib.Nifti1Image(data.astype(dtype), case.affine)
        img.header.set_slope_inter(np.nan, np.nan)
        return _save(img, Path(f"{stem}.nii.gz"))

    return write


@dataclass(frozen=True)
class Variant:
    name: str
    write: Writer
    expect: str = "same"  # "same", "close" (Dice >= CLOSE_DICE) or the refusal code
    labels: Writer | None = None  # how the reference label map is stored


CLOSE_DICE = 0.9

VARIANTS: tuple[Variant, ...] = (
    Variant("plain", _plain),
    Variant("afni-extension", _with_extensions((4, AFNI_XML))),
    Variant("comment-extension", _with_extensions((6, b"conformance\x00\x00\x00\x00"))),
    Variant("several-extensions", _with_extensions((6, b"a comment"), (4, AFNI_XML), (2, b"x"))),
    Variant("scl-slope-inter", _scaled),
    Variant("qform-only", _forms(qform=True, sform=False)),
    Variant("sform-only", _forms(qform=False, sform=True)),
    Variant("qform-sform-disagree", _forms(True, True, disagree=True)),
    Variant("nifti2", _nifti2),
    Variant("uncompressed-nii", _ending(".nii")),
    Variant("bzip2-nii", _ending(".nii.bz2")),
    Variant("big-endian", _big_endian),
    *(Variant(f"dtype-{d}", _dtype(d)) for d in ("int16", "uint16", "int32", "uint32")),
    *(Variant(f"dtype-{d}", _dtype(d)) for d in ("int64", "uint64", "float32", "float64")),
    Variant("dtype-uint8", _dtype("uint8"), expect="close"),
    Variant("dtype-int8", _dtype("int8"), expect="close"),
    Variant("4d-one-volume", _extra_axes(1)),
    Variant("5d-singletons", _extra_axes(1, 1)),
    Variant("labels-float32", _plain, labels=_label_writer("float32")),
    Variant("labels-int16", _plain, labels=_label_writer("int16")),
    Variant("hdr-img-pair", _pair, expect="not_nifti"),
)


def write_variant(case: CroppedCase, variant: Variant, folder: Path) -> dict[str, Path]:
    """The variant's files in ``folder``: the four modalities and a reference label map."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {m: variant.write(case, m, case.images[m], folder / f"case_{m}") for m in MODALITIES}
    label_writer = variant.labels or _label_writer("uint8")
    paths["reference"] = label_writer(case, "seg", case.labels, folder / "case_seg")
    return paths


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the tumour (non-zero) masks of two label maps."""
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
