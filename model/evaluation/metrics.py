"""Segmentation metrics in the BraTS convention (see ``shared/spec/metrics.md``).

Per region (WT, TC, ET) a prediction P is compared with a reference G on the full
voxel grid: Dice, sensitivity, specificity (true negatives over the whole grid),
positive predictive value, Hausdorff95 and the two volumes. Empty masks follow the
official evaluation's table exactly; a value the official evaluation reports as
undefined (NaN) is ``None`` here, so that it becomes ``null`` in JSON.

Hausdorff95 is MedPy 0.4.0's ``hd95``: surfaces are the voxels removed by one
erosion with the 6-neighbour cross (outside the image is background), distances go
both ways in millimetres, and the 95th percentile (linear interpolation) is taken
over the two distance sets pooled together.

Every function is pure: arrays in, new arrays or numbers out, inputs never modified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage

from model.labels import REGIONS, region_mask, to_brats2018

#: Percentile of the pooled surface distances that Hausdorff95 reports.
HD_PERCENTILE = 95.0


@dataclass(frozen=True)
class RegionMetrics:
    """Metrics of one region of one case.

    Attributes:
        dice: Dice coefficient, 1.0 when both masks are empty.
        sensitivity: TP / (TP + FN); 1.0 when both masks are empty, 0.0 when only
            the reference is empty.
        specificity: TN / (TN + FP) with TN counted over the whole grid; ``None``
            only when the reference fills the whole grid (no negatives).
        ppv: TP / (TP + FP); ``None`` (undefined) when the prediction is empty.
        hd95: Hausdorff95 in mm; 0.0 when both masks are empty, the grid diagonal
            when exactly one is.
        volume_pred_ml: predicted volume in millilitres.
        volume_ref_ml: reference volume in millilitres.
    """

    dice: float
    sensitivity: float
    specificity: float | None
    ppv: float | None
    hd95: float
    volume_pred_ml: float
    volume_ref_ml: float

    def to_dict(self) -> dict[str, float | None]:
        """Returns the metrics as a JSON-ready dict (undefined values are ``None``)."""
        return asdict(self)


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Returns ``spacing`` as a tuple of floats after checking it fits ``ndim`` axes."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"spacing must be a sequence of {ndim} numbers (mm per voxel), got {spacing!r}"
        ) from err
    if len(values) != ndim:
        raise ValueError(
            f"spacing must have one value per axis ({ndim}), got {len(values)}: {spacing!r}"
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be positive and finite, got {spacing!r}")
    return values


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns both masks as boolean arrays after checking that their shapes agree."""
    p = np.asarray(pred)
    g = np.asarray(ref)
    if p.shape != g.shape:
        raise ValueError(
            f"pred and ref must have the same shape, got pred {p.shape} and ref {g.shape}"
        )
    if p.ndim == 0 or p.size == 0:
        raise ValueError(f"masks must be non-empty arrays with at least one axis, got {p.shape}")
    return p.astype(bool, copy=False), g.astype(bool, copy=False)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a binary mask.

    The surface is the set of voxels removed by one binary erosion with the
    face-neighbour cross (6-neighbour in 3-D); outside the image counts as
    background, so mask voxels on the image border are surface voxels.

    Args:
        mask: binary mask of any dimensionality (nonzero is foreground).

    Returns:
        A new boolean array of the same shape, True on the surface.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim == 0:
        raise ValueError("mask must have at least one axis, got a 0-d array")
    cross = ndimage.generate_binary_structure(m.ndim, 1)
    eroded = ndimage.binary_erosion(m, structure=cross, iterations=1, border_value=0)
    return m & ~eroded


def grid_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of a voxel grid: sqrt(sum((shape * spacing)^2)).

    Args:
        shape: number of voxels per axis.
        spacing: voxel size per axis in mm.

    Returns:
        The diagonal, e.g. 373.1287 for 240 x 240 x 155 at 1 mm.
    """
    sp = _check_spacing(spacing, len(shape))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp, strict=True))))


def hausdorff95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm, BraTS (MedPy ``hd95``) convention.

    The distances from every surface voxel of ``pred`` to the nearest surface voxel
    of ``ref`` and from every surface voxel of ``ref`` to the nearest of ``pred`` are
    pooled, and their 95th percentile (linear interpolation) is returned. It is
    computed exactly with a Euclidean distance transform on the bounding box of the
    union padded by one background voxel, which leaves every surface unchanged.

    Args:
        pred: predicted binary mask (nonzero is foreground).
        ref: reference binary mask of the same shape.
        spacing: voxel size per axis in mm.

    Returns:
        HD95 in mm; 0.0 when both masks are empty and the grid diagonal (see
        :func:`grid_diagonal_mm`) when exactly one is.

    Raises:
        ValueError: the shapes differ or ``spacing`` does not fit them.
    """
    p, g = _check_pair(pred, ref)
    sp = _check_spacing(spacing, p.ndim)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return 0.0
    if not p_any or not g_any:
        return grid_diagonal_mm(p.shape, sp)

    # Crop to the union's bounding box and pad by one background voxel. Every
    # neighbour outside the box is background or outside the image, and both count
    # as background (binary_erosion's border_value=0), so the surfaces are those of
    # the full grid; voxels on the original image border stay surface voxels.
    coords = np.nonzero(p | g)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    p_crop = np.pad(p[box], 1)
    g_crop = np.pad(g[box], 1)

    s_p = surface(p_crop)
    s_g = surface(g_crop)
    # Every surface voxel of either mask lies in the crop, so the distance to the
    # nearest one is exact there.
    d_pg = ndimage.distance_transform_edt(~s_g, sampling=sp)[s_p]
    d_gp = ndimage.distance_transform_edt(~s_p, sampling=sp)[s_g]
    return float(np.percentile(np.concatenate((d_pg, d_gp)), HD_PERCENTILE))


def _volume_ml(count: int, spacing: tuple[float, ...]) -> float:
    """Volume in millilitres of ``count`` voxels of the given spacing in mm."""
    return float(count * math.prod(spacing) / 1000.0)


def region_metrics(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]
) -> RegionMetrics:
    """Compares one region's predicted mask with its reference mask.

    Counts are taken over the full grid. Empty masks follow the official table:

    ============================  ====  ========  ===========  ===========  ====
    case                          Dice  HD95      Sensitivity  Specificity  PPV
    ============================  ====  ========  ===========  ===========  ====
    both empty                    1     0         1            1            None
    reference empty, pred not     0     diagonal  0            computed     0
    reference not, pred empty     0     diagonal  0            computed     None
    ============================  ====  ========  ===========  ===========  ====

    Args:
        pred_mask: predicted binary mask (nonzero is foreground).
        ref_mask: reference binary mask of the same shape.
        spacing: voxel size per axis in mm.

    Returns:
        The region's :class:`RegionMetrics`.

    Raises:
        ValueError: the shapes differ or ``spacing`` does not fit them.
    """
    p, g = _check_pair(pred_mask, ref_mask)
    sp = _check_spacing(spacing, p.ndim)
    n_p = int(np.count_nonzero(p))
    n_g = int(np.count_nonzero(g))
    tp = int(np.count_nonzero(p & g))
    fp = n_p - tp
    fn = n_g - tp
    tn = p.size - tp - fp - fn

    specificity: float | None
    ppv: float | None
    if n_p == 0 and n_g == 0:
        dice, sensitivity, specificity, ppv = 1.0, 1.0, 1.0, None
    else:
        dice = 2.0 * tp / (n_p + n_g)
        sensitivity = tp / n_g if n_g else 0.0
        specificity = tn / (tn + fp) if tn + fp else None
        ppv = tp / n_p if n_p else None

    return RegionMetrics(
        dice=float(dice),
        sensitivity=float(sensitivity),
        specificity=None if specificity is None else float(specificity),
        ppv=None if ppv is None else float(ppv),
        hd95=hausdorff95(p, g, sp),
        volume_pred_ml=_volume_ml(n_p, sp),
        volume_ref_ml=_volume_ml(n_g, sp),
    )


def _check_volume(labels: np.ndarray, name: str) -> np.ndarray:
    """Returns ``labels`` as an array after checking that it is a 3-D volume."""
    arr = np.asarray(labels)
    if arr.ndim != 3 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 3-D label map, got shape {arr.shape}")
    return arr


def evaluate_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float],
    pred_et_label: int | None = None,
    ref_et_label: int | None = None,
) -> dict[str, RegionMetrics]:
    """Evaluates a predicted label map against a reference on the WT, TC and ET regions.

    Args:
        pred_labels: predicted 3-D BraTS label map, ET written as 4 or 3.
        ref_labels: reference 3-D BraTS label map of the same shape, ET as 4 or 3.
        spacing: voxel size per array axis in mm; three positive finite numbers.
        pred_et_label: the value ``pred_labels`` uses for ET (4 or 3); ``None``
            infers it (see :func:`model.labels.to_brats2018`).
        ref_et_label: the same for ``ref_labels``.

    Returns:
        ``{"WT": RegionMetrics, "TC": ..., "ET": ...}``.

    Raises:
        ValueError: the maps are not 3-D, their shapes differ, or ``spacing`` is not
            three positive finite numbers.
        model.labels.LabelError: a map holds a value that is not a BraTS label.
    """
    pred = _check_volume(pred_labels, "pred_labels")
    ref = _check_volume(ref_labels, "ref_labels")
    if pred.shape != ref.shape:
        raise ValueError(
            f"pred_labels and ref_labels must have the same shape, got pred {pred.shape} "
            f"and ref {ref.shape}"
        )
    sp = _check_spacing(spacing, 3)
    pred18 = to_brats2018(pred, pred_et_label)
    ref18 = to_brats2018(ref, ref_et_label)
    return {
        region: region_metrics(region_mask(pred18, region), region_mask(ref18, region), sp)
        for region in REGIONS
    }


def region_volumes_ml(
    labels: np.ndarray, spacing: Sequence[float], et_label: int | None = None
) -> dict[str, float]:
    """Volumes of the WT, TC and ET regions of one label map, for cases without a reference.

    Args:
        labels: 3-D BraTS label map, ET written as 4 or 3.
        spacing: voxel size per array axis in mm; three positive finite numbers.
        et_label: the value ``labels`` uses for ET (4 or 3); ``None`` infers it.

    Returns:
        ``{"WT": mL, "TC": mL, "ET": mL}``.

    Raises:
        ValueError: ``labels`` is not 3-D or ``spacing`` is not three positive
            finite numbers.
        model.labels.LabelError: the map holds a value that is not a BraTS label.
    """
    arr = _check_volume(labels, "labels")
    sp = _check_spacing(spacing, 3)
    labels18 = to_brats2018(arr, et_label)
    return {
        region: _volume_ml(int(np.count_nonzero(region_mask(labels18, region))), sp)
        for region in REGIONS
    }


def summarise(
    cases: Mapping[str, Mapping[str, RegionMetrics]],
) -> dict[str, dict[str, float | None]]:
    """Mean of every metric per region over a set of cases.

    Undefined values (``None``, or NaN) are left out of a mean rather than counted
    as zero, so e.g. the mean PPV is over the cases whose prediction is non-empty.
    A metric with no defined value in any case has mean ``None``. A region missing
    from a case is left out for that case.

    Args:
        cases: ``{case_id: {region: RegionMetrics}}``, e.g. from :func:`evaluate_case`.

    Returns:
        ``{region: {metric: mean or None}}`` with regions in order of first
        appearance; an empty dict for no cases.
    """
    names = [f.name for f in fields(RegionMetrics)]
    values: dict[str, dict[str, list[float]]] = {}
    for per_region in cases.values():
        for region, metrics in per_region.items():
            bucket = values.setdefault(region, {name: [] for name in names})
            for name in names:
                value = getattr(metrics, name)
                if value is not None and not math.isnan(value):
                    bucket[name].append(float(value))
    return {
        region: {name: (math.fsum(vals) / len(vals) if vals else None) for name, vals in by.items()}
        for region, by in values.items()
    }
