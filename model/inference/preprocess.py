"""Brain mask, per-modality z-score normalisation and cropping to the brain.

The spec normalises each modality to zero mean and unit variance inside the brain mask,
the voxels that are non-zero in any modality (which is also the mask that separates the
background class from normal tissue). Every function here is pure: it returns new
arrays and never modifies its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def _check_images(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be (C, X, Y, Z), got shape {arr.shape}")
    return arr


def brain_mask(images: np.ndarray) -> np.ndarray:
    """The brain: voxels that are non-zero in at least one modality.

    Args:
        images: array ``(C, X, Y, Z)``.

    Returns:
        bool array ``(X, Y, Z)``.
    """
    return np.any(_check_images(images) != 0, axis=0)


def zscore(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-modality z-score inside ``mask``; voxels outside the mask become 0.

    Mean and standard deviation are taken over the mask voxels of each modality (in
    float64); a modality with zero spread inside the mask is only centred.

    Args:
        images: array ``(C, X, Y, Z)``.
        mask: bool array ``(X, Y, Z)``, not empty.

    Returns:
        New float32 array ``(C, X, Y, Z)``.

    Raises:
        ValueError: shapes disagree or the mask is empty.
    """
    arr = _check_images(images)
    m = np.asarray(mask, dtype=bool)
    if m.shape != arr.shape[1:]:
        raise ValueError(f"mask must have shape {arr.shape[1:]}, got {m.shape}")
    if not m.any():
        raise ValueError("mask is empty: there is no brain voxel to normalise over")
    out = np.zeros(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        values = arr[c][m].astype(np.float64)
        mean = values.mean()
        std = values.std()
        out[c][m] = (values - mean) / (std if std > 0 else 1.0)
    return out


def _margins(margin: int | Sequence[int]) -> tuple[int, int, int]:
    values = tuple(margin) if isinstance(margin, Iterable) else (margin,) * 3
    if len(values) != 3 or any(int(v) != v or v < 0 for v in values):
        raise ValueError(f"margin must be an int >= 0 or three of them, got {margin!r}")
    x, y, z = (int(v) for v in values)
    return x, y, z


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, slice, slice]:
    """The smallest box holding every true voxel of ``mask``, grown by ``margin``.

    Args:
        mask: bool array ``(X, Y, Z)``.
        margin: voxels added on each side, one value or one per axis; the box is clipped
            to the grid.

    Returns:
        Three slices, usable as ``array[..., *box]``.

    Raises:
        ValueError: the mask is empty or not 3D, or the margin is negative.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3D (X, Y, Z), got shape {m.shape}")
    pads = _margins(margin)
    if not m.any():
        raise ValueError("mask is empty: it has no bounding box")
    box = []
    for axis, pad in enumerate(pads):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(m.any(axis=other))
        start = max(int(hits[0]) - pad, 0)
        stop = min(int(hits[-1]) + 1 + pad, m.shape[axis])
        box.append(slice(start, stop))
    return (box[0], box[1], box[2])


@dataclass(frozen=True)
class Preprocessed:
    """A case cropped to its brain and normalised.

    Attributes:
        images: float32 ``(C, x, y, z)``, z-scored inside the mask, 0 outside.
        mask: bool ``(x, y, z)``, the brain inside the crop.
        bbox: the crop's slices on the full grid.
        full_shape: the full grid ``(X, Y, Z)``.
    """

    images: np.ndarray
    mask: np.ndarray
    bbox: tuple[slice, slice, slice]
    full_shape: tuple[int, int, int]


def preprocess(images: np.ndarray, margin: int | Sequence[int] = 0) -> Preprocessed:
    """Crops ``images`` to the brain's bounding box and z-scores each modality in the brain.

    Args:
        images: array ``(C, X, Y, Z)``; zero outside the brain.
        margin: voxels kept around the brain on each side (clipped to the grid).

    Returns:
        The cropped, normalised images with what :func:`paste` needs to undo the crop.

    Raises:
        ValueError: ``images`` is not 4D or is zero everywhere.
    """
    arr = _check_images(images)
    full = brain_mask(arr)
    if not full.any():
        raise ValueError("images are zero everywhere: there is no brain to crop to")
    box = bounding_box(full, margin)
    mask = full[box].copy()
    cropped = zscore(arr[(slice(None), *box)], mask)  # (C, x, y, z)
    shape = full.shape
    return Preprocessed(
        images=cropped, mask=mask, bbox=box, full_shape=(shape[0], shape[1], shape[2])
    )


def paste(cropped: np.ndarray, prep: Preprocessed, fill: float = 0) -> np.ndarray:
    """Puts an array computed on the crop back on the full grid.

    Args:
        cropped: array ``(..., x, y, z)`` on the crop of ``prep`` (leading axes such as
            classes are kept).
        prep: the :class:`Preprocessed` the crop came from.
        fill: value given to voxels outside the crop.

    Returns:
        New array ``(..., X, Y, Z)`` of ``cropped``'s dtype.

    Raises:
        ValueError: the trailing shape of ``cropped`` is not the crop's.
    """
    arr = np.asarray(cropped)
    crop_shape = tuple(s.stop - s.start for s in prep.bbox)
    if arr.ndim < 3 or arr.shape[-3:] != crop_shape:
        raise ValueError(f"cropped must end in the crop shape {crop_shape}, got {arr.shape}")
    out = np.full((*arr.shape[:-3], *prep.full_shape), fill, dtype=arr.dtype)
    out[(..., *prep.bbox)] = arr
    return out
