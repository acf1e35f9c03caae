"""Brain mask, per-modality intensity normalisation and cropping to the brain.

The spec normalises each modality to zero mean and unit variance inside the brain mask,
the voxels that are non-zero in any modality (which is also the mask that separates the
background class from normal tissue). Two variants, not in the paper, aim at scans from
other scanners (:func:`normalise`): the z-score after clipping each modality to its
0.5th-99.5th percentiles in the brain, so that a few extreme voxels (vessels, artefacts)
cannot compress the rest; and histogram standardisation (Nyul and Udupa, 1999): the
percentile landmarks of each modality are mapped piecewise-linearly onto fixed
landmarks, which undoes any monotone change of contrast between the landmarks, not
only a change of scale and offset. The fixed landmarks are the standard normal's
quantiles at the same percentiles (Nyul learns them from the training set; a fixed
scale needs no training statistics in the checkpoint and keeps the values in the
z-score's range). Every function here is pure: it returns new arrays and never
modifies its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from model.defaults import DEFAULT_NORMALISATION, NORMALISATIONS


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
    m = _checked_mask(arr, mask)
    out = np.zeros(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        values = arr[c][m].astype(np.float64)
        mean = values.mean()
        std = values.std()
        out[c][m] = (values - mean) / (std if std > 0 else 1.0)
    return out


#: Percentiles of the brain voxels clipped to by the ``clipped`` normalisation.
CLIP_PERCENTILES = (0.5, 99.5)
#: Percentile landmarks of the ``landmarks`` normalisation: Nyul's deciles between the
#: 1st and 99th percentiles.
LANDMARK_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
#: Where the landmarks go: the standard normal's quantiles at the same percentiles.
STANDARD_LANDMARKS = tuple(NormalDist().inv_cdf(p / 100.0) for p in LANDMARK_PERCENTILES)


def _checked_mask(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    if m.shape != arr.shape[1:]:
        raise ValueError(f"mask must have shape {arr.shape[1:]}, got {m.shape}")
    if not m.any():
        raise ValueError("mask is empty: there is no brain voxel to normalise over")
    return m


def clipped_zscore(
    images: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float] = CLIP_PERCENTILES
) -> np.ndarray:
    """Per-modality z-score inside ``mask`` after clipping each modality's brain voxels
    to its ``percentiles``; voxels outside the mask become 0.

    Returns:
        New float32 array ``(C, X, Y, Z)``.

    Raises:
        ValueError: shapes disagree or the mask is empty.
    """
    arr = _check_images(images)
    m = _checked_mask(arr, mask)
    clipped = np.zeros(arr.shape, dtype=np.float64)
    for c in range(arr.shape[0]):
        values = arr[c][m].astype(np.float64)
        low, high = np.percentile(values, percentiles)
        clipped[c][m] = np.clip(values, low, high)
    return zscore(clipped, m)


def _increasing(values: np.ndarray) -> np.ndarray:
    """``values`` (non-decreasing) nudged to be strictly increasing, so that a piecewise
    linear map through them is defined (ties occur in modalities with few grey levels)."""
    spread = float(values[-1] - values[0])
    step = (spread if spread > 0 else 1.0) * 1e-6
    return np.maximum.accumulate(values) + step * np.arange(len(values))


def landmark_standardise(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-modality histogram standardisation inside ``mask``: the modality's
    :data:`LANDMARK_PERCENTILES` in the brain go to :data:`STANDARD_LANDMARKS`, values
    in between linearly, values beyond the end landmarks with the slope of the whole
    range between them.
    Voxels outside the mask become 0; a modality with no spread in the mask becomes 0.

    Returns:
        New float32 array ``(C, X, Y, Z)``.

    Raises:
        ValueError: shapes disagree or the mask is empty.
    """
    arr = _check_images(images)
    m = _checked_mask(arr, mask)
    target = np.asarray(STANDARD_LANDMARKS)
    out = np.zeros(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        values = arr[c][m].astype(np.float64)
        source = np.percentile(values, LANDMARK_PERCENTILES)
        if source[-1] <= source[0]:
            continue  # no spread between the end landmarks: nothing to standardise
        source = _increasing(source)
        mapped = np.interp(values, source, target)
        # Beyond the end landmarks, the slope of the whole 1st-99th percentile range: an
        # end segment can be steep (a narrow 90th-99th range) and throw the few extreme
        # voxels far out.
        slope = (target[-1] - target[0]) / (source[-1] - source[0])
        below, above = values < source[0], values > source[-1]
        mapped[below] = target[0] + (values[below] - source[0]) * slope
        mapped[above] = target[-1] + (values[above] - source[-1]) * slope
        out[c][m] = mapped
    return out


def normalise(
    images: np.ndarray, mask: np.ndarray, method: str = DEFAULT_NORMALISATION
) -> np.ndarray:
    """Each modality of ``images`` normalised inside ``mask`` by ``method`` (one of
    :data:`model.defaults.NORMALISATIONS`: ``zscore``, the paper's; ``clipped``;
    ``landmarks``); 0 outside the mask.

    Raises:
        ValueError: an unknown method, shapes that disagree or an empty mask.
    """
    if method == "zscore":
        return zscore(images, mask)
    if method == "clipped":
        return clipped_zscore(images, mask)
    if method == "landmarks":
        return landmark_standardise(images, mask)
    raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}; got {method!r}")


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
        images: float32 ``(C, x, y, z)``, normalised inside the mask, 0 outside.
        mask: bool ``(x, y, z)``, the brain inside the crop.
        bbox: the crop's slices on the full grid.
        full_shape: the full grid ``(X, Y, Z)``.
    """

    images: np.ndarray
    mask: np.ndarray
    bbox: tuple[slice, slice, slice]
    full_shape: tuple[int, int, int]


def preprocess(
    images: np.ndarray,
    margin: int | Sequence[int] = 0,
    normalisation: str = DEFAULT_NORMALISATION,
) -> Preprocessed:
    """Crops ``images`` to the brain's bounding box and normalises each modality in the
    brain (the paper's z-score unless ``normalisation`` names another, see
    :func:`normalise`).

    Args:
        images: array ``(C, X, Y, Z)``; zero outside the brain.
        margin: voxels kept around the brain on each side (clipped to the grid).
        normalisation: one of :data:`model.defaults.NORMALISATIONS`.

    Returns:
        The cropped, normalised images with what :func:`paste` needs to undo the crop.

    Raises:
        ValueError: ``images`` is not 4D or is zero everywhere, or an unknown
            normalisation.
    """
    arr = _check_images(images)
    full = brain_mask(arr)
    if not full.any():
        raise ValueError("images are zero everywhere: there is no brain to crop to")
    box = bounding_box(full, margin)
    mask = full[box].copy()
    cropped = normalise(arr[(slice(None), *box)], mask, normalisation)  # (C, x, y, z)
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
