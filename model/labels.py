"""Label conventions, evaluated regions and the internal class layout of the three tasks.

Everything that names a label value lives here, so that no other module spells out
``4`` or ``{1, 2, 4}`` by hand.

BraTS 2018-2021 label maps write 0 background, 1 NCR/NET, 2 edema, 4 enhancing tumour;
BraTS 2023 and later write the enhancing tumour as 3.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

# BraTS label values (2018-2021 convention).
BACKGROUND = 0
NCR_NET = 1
EDEMA = 2
ENHANCING = 4
ENHANCING_2023 = 3

#: Label conventions by the value they give the enhancing tumour.
ET_LABELS = (ENHANCING, ENHANCING_2023)


class TaskClass(IntEnum):
    """The 5-class target of tasks 1 and 2 (background is outside the brain)."""

    BACKGROUND = 0
    NORMAL = 1
    NCR_NET = 2
    EDEMA = 3
    ENHANCING = 4


class EnhancingClass(IntEnum):
    """The 2-class target of task 3 (trained in the tumour core)."""

    NOT_ENHANCING = 0
    ENHANCING = 1


NUM_TASK_CLASSES = (len(TaskClass), len(TaskClass), len(EnhancingClass))
"""Classes per task: task 1 (coarse), task 2 (tumour), task 3 (enhancing vs not); the
network's heads (:mod:`model.net.network`) and the tiled inference's outputs
(:mod:`model.inference.tiling`) are sized by it."""

TUMOUR_CLASSES = (TaskClass.NCR_NET, TaskClass.EDEMA, TaskClass.ENHANCING)
CORE_CLASSES = (TaskClass.NCR_NET, TaskClass.ENHANCING)

#: Evaluated regions as sets of BraTS 2018 labels.
REGIONS: dict[str, tuple[int, ...]] = {
    "WT": (NCR_NET, EDEMA, ENHANCING),
    "TC": (NCR_NET, ENHANCING),
    "ET": (ENHANCING,),
}


class LabelError(ValueError):
    """A label map holds values that are not BraTS labels."""


def to_brats2018(labels: np.ndarray, et_label: int | None = None) -> np.ndarray:
    """Returns a uint8 copy of ``labels`` in the 2018 convention (ET = 4).

    Args:
        labels: integer or float label map in either convention. Float maps are
            accepted when every value is integral.
        et_label: the value the map uses for ET (4 or 3). ``None`` infers it: a map
            holding 3 is taken as the 2023 convention. A map may not hold both.

    Raises:
        LabelError: a value other than 0, 1, 2 and one ET value is present.
    """
    arr = np.asarray(labels)
    if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
        raise LabelError("label map holds non-integer values; expected 0, 1, 2 and 4 (or 3)")
    values = set(np.unique(arr).astype(np.int64).tolist())
    if et_label is None:
        has3, has4 = ENHANCING_2023 in values, ENHANCING in values
        if has3 and has4:
            raise LabelError(
                "label map holds both 3 and 4; use 4 (BraTS 2018-2021) or 3 (BraTS 2023) for "
                "the enhancing tumour, not both"
            )
        et_label = ENHANCING_2023 if has3 else ENHANCING
    if et_label not in ET_LABELS:
        raise LabelError(f"et_label must be 4 or 3, got {et_label!r}")
    allowed = {BACKGROUND, NCR_NET, EDEMA, et_label}
    bad = sorted(values - allowed)
    if bad:
        raise LabelError(
            f"label map holds values {bad[:10]} that are not BraTS labels; "
            f"expected a subset of {sorted(allowed)}"
        )
    out = arr.astype(np.uint8)
    if et_label != ENHANCING:
        out[out == et_label] = ENHANCING
    return out


def from_brats2018(labels: np.ndarray, et_label: int = ENHANCING) -> np.ndarray:
    """Returns a uint8 copy of a 2018-convention map written with ``et_label`` for ET."""
    if et_label not in ET_LABELS:
        raise ValueError(f"et_label must be 4 or 3, got {et_label!r}")
    out = np.asarray(labels).astype(np.uint8)
    if et_label != ENHANCING:
        out[out == ENHANCING] = et_label
    return out


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of ``region`` ('WT', 'TC' or 'ET') in a 2018-convention label map."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {sorted(REGIONS)}, got {region!r}")
    return np.isin(labels, REGIONS[region])


def labels_to_task_target(labels: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Maps a 2018-convention label map to the 5-class target of tasks 1 and 2.

    Voxels outside ``brain`` are background; brain voxels without a tumour label
    are normal tissue.
    """
    target = np.zeros(labels.shape, dtype=np.int64)
    target[brain] = TaskClass.NORMAL
    target[labels == NCR_NET] = TaskClass.NCR_NET
    target[labels == EDEMA] = TaskClass.EDEMA
    target[labels == ENHANCING] = TaskClass.ENHANCING
    return target
