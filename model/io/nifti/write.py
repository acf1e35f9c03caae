"""Writing a case's results as NIfTI on the input's own grid and header (the label map,
the class probabilities), atomically: a reader never sees half a file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from model.atomic import atomic_write
from model.io.nifti.files import split_nifti_name
from model.io.volumes import Case, PathLike
from model.labels import ENHANCING, from_brats2018, to_brats2018


def _output_header(case: Case, dtype: type) -> nib.Nifti1Header:
    """A copy of the case's header for an output of ``dtype``, values stored unscaled."""
    header = case.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(np.nan, np.nan)  # no scaling: stored values are the values
    header["cal_min"] = 0
    header["cal_max"] = 0
    header.set_intent("none")
    return header


def _atomic_save(img: nib.Nifti1Image, path: PathLike) -> Path:
    """Writes ``img`` with :func:`model.atomic.atomic_write` (readers never see a
    half-written file; missing parent folders are created)."""
    target = Path(path)
    if split_nifti_name(target) is None:
        raise ValueError(f"path must end in .nii, .nii.gz or .nii.bz2, got {str(target)!r}")
    return atomic_write(target, lambda tmp: nib.save(img, tmp))


def _image_class(header: nib.Nifti1Header) -> type[nib.Nifti1Image]:
    return nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image


def save_labels(labels: np.ndarray, case: Case, path: PathLike, et_label: int = ENHANCING) -> Path:
    """Writes a BraTS 2018-convention label map as a uint8 NIfTI on the case's grid.

    The output has the case's affine and a copy of its header (qform, sform and their
    codes preserved); the datatype is uint8 and scaling is off, so values are exact.

    Args:
        labels: integer array ``(X, Y, Z)`` with values in {0, 1, 2, 4}.
        case: the case the labels belong to.
        path: output file, ``.nii`` or ``.nii.gz``; written atomically, parent folders
            created.
        et_label: the value to write for ET: 4 (BraTS 2018-2021) or 3 (BraTS 2023).

    Returns:
        The path written.

    Raises:
        ValueError: wrong shape, values that are not BraTS 2018 labels, or a bad
            ``et_label`` / extension.
    """
    arr = np.asarray(labels)
    if arr.shape != case.shape:
        raise ValueError(f"labels must have the case's shape {case.shape}, got {arr.shape}")
    checked = to_brats2018(arr, et_label=ENHANCING)
    data = from_brats2018(checked, et_label=et_label)
    header = _output_header(case, np.uint8)
    img = _image_class(header)(data, case.affine, header=header)
    return _atomic_save(img, path)


def save_probabilities(probs: np.ndarray, case: Case, path: PathLike) -> Path:
    """Writes class probabilities ``(C, X, Y, Z)`` as a float32 4D NIfTI ``(X, Y, Z, C)``.

    Args:
        probs: float array ``(C, X, Y, Z)``, one channel per class.
        case: the case the probabilities belong to; its affine and header are copied.
        path: output file, ``.nii`` or ``.nii.gz``; written atomically, parent folders
            created.

    Returns:
        The path written.

    Raises:
        ValueError: ``probs`` is not ``(C, X, Y, Z)`` on the case's grid, or bad extension.
    """
    arr = np.asarray(probs)
    if arr.ndim != 4 or arr.shape[1:] != case.shape:
        raise ValueError(
            f"probs must have shape (C, {', '.join(map(str, case.shape))}), got {arr.shape}"
        )
    data = np.ascontiguousarray(np.moveaxis(arr.astype(np.float32), 0, -1))  # (X, Y, Z, C)
    header = _output_header(case, np.float32)
    img = _image_class(header)(data, case.affine, header=header)
    return _atomic_save(img, path)
