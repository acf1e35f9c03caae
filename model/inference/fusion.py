"""Fusing the three task outputs into one BraTS label map, as the cascade does.

Paper section III-A: task 1 finds the coarse whole tumour; that mask is dilated by 5
voxels; inside it task 2 labels the voxels (whole tumour, edema, core); inside task 2's
core task 3 decides enhancing tumour vs NCR/NET. Choices the paper leaves open:

- coarse whole tumour: the merged tumour-class probability of task 1 (NCR/NET + ED +
  ET) exceeds 0.5, i.e. exceeds the merged non-tumour probability;
- dilation: a Euclidean ball of radius 5 voxels (every voxel within 5 voxel edges of the
  coarse mask, measured on the voxel grid);
- task 2: the voxel's arg-max class among its five; a tumour class is kept only inside
  the dilated mask (ties break towards the lower class index);
- task 3: inside task 2's core (arg-max NCR/NET or ET), ET where P(ET) > 0.5, else
  NCR/NET; task 3 never touches edema or voxels outside the core;
- no tumour outside the brain mask.

Not in the paper, one option away (``rule="regions"``): task 2 decided region by region,
as the BraTS regions nest, instead of by its arg-max class. Whole tumour where task 2's
tumour probability (NCR/NET + ED + ET) exceeds 0.5; inside it, core where the core
probability (NCR/NET + ET) exceeds the edema probability; task 3 as above. A voxel whose
tumour probability is split between classes (say 0.3 edema, 0.3 core, 0.4 background
and normal tissue) is tumour under this rule and background under the arg-max.

A third rule (``rule="joint"``) is the region rule with the whole tumour taken from both
tasks: where the mean of task 1's and task 2's tumour probabilities exceeds 0.5 (inside
the dilated coarse tumour, as always), so that the two passes vote on the tumour's
extent; core and ET inside it as the region rule decides them.

The region rule's lines can move (:class:`RegionThresholds`): whole tumour above another
tumour probability, core where the core's share of the tumour probability exceeds
another fraction, ET above another task-3 probability (the ET line holds for both
rules). At 0.5 each, the rule is as described above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.defaults import FUSION_RULES, FusionRule
from model.inference.tiling import TaskProbabilities
from model.labels import EDEMA, ENHANCING, NCR_NET, TUMOUR_CLASSES, EnhancingClass, TaskClass

DILATION_VOXELS = 5


@dataclass(frozen=True)
class RegionThresholds:
    """Where the fusion draws its lines (each a probability in (0, 1)).

    Attributes:
        whole: region rule: whole tumour where task 2's tumour probability exceeds this
            (joint rule: the mean of task 1's and task 2's).
        core: region rule: core where the core's share of task 2's tumour probability,
            (NCR/NET + ET) / (NCR/NET + ED + ET), exceeds this (0.5: core above edema).
        enhancing: both rules: ET inside the core where task 3's P(ET) exceeds this.
    """

    whole: float = 0.5
    core: float = 0.5
    enhancing: float = 0.5

    def __post_init__(self) -> None:
        for name in ("whole", "core", "enhancing"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} threshold must lie strictly between 0 and 1; got {value}")


#: Channels of :func:`fused_probabilities`, by the BraTS label each stands for.
FUSED_CHANNEL_LABELS = (0, NCR_NET, EDEMA, ENHANCING)


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within ``radius`` voxel edges (Euclidean) of ``mask``; a new array."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0 or not mask.any():
        return mask.copy()
    r = int(np.ceil(radius))
    hits = np.nonzero(mask)
    box = tuple(
        slice(max(int(h.min()) - r, 0), min(int(h.max()) + r + 1, n))
        for h, n in zip(hits, mask.shape, strict=True)
    )
    out = np.zeros_like(mask)
    out[box] = ndimage.distance_transform_edt(~mask[box]) <= radius
    return out


def coarse_tumour(probs: TaskProbabilities) -> np.ndarray:
    """Task 1's whole tumour: merged tumour probability > 0.5."""
    return coarse_tumour_probability(probs) > 0.5


def coarse_tumour_probability(probs: TaskProbabilities) -> np.ndarray:
    """Task 1's merged tumour probability (NCR/NET + ED + ET)."""
    return probs.coarse[list(TUMOUR_CLASSES)].sum(axis=0)


def task2_core_and_tumour(probs: TaskProbabilities) -> tuple[np.ndarray, np.ndarray]:
    """Task 2's core probability (NCR/NET + ET) and tumour probability (core + ED)."""
    p2 = probs.tumour
    core = p2[TaskClass.NCR_NET] + p2[TaskClass.ENHANCING]
    return core, core + p2[TaskClass.EDEMA]


def joint_tumour_probability(probs: TaskProbabilities, task2_tumour: np.ndarray) -> np.ndarray:
    """The ``joint`` rule's vote: the mean of task 1's and task 2's tumour probabilities
    (``task2_tumour``: task 2's NCR/NET + ED + ET, which the caller has)."""
    return 0.5 * (task2_tumour + coarse_tumour_probability(probs))


def fusion_region(
    probs: TaskProbabilities,
    brain: np.ndarray | None = None,
    dilation: float = DILATION_VOXELS,
    coarse: np.ndarray | None = None,
) -> np.ndarray:
    """Where tasks 2 and 3 label: task 1's coarse tumour dilated, inside the brain.

    Args:
        probs: task probabilities on one grid (X, Y, Z).
        brain: optional brain mask; no tumour is labelled outside it.
        dilation: radius in voxels of the dilation of task 1's coarse tumour.
        coarse: :func:`coarse_tumour` of ``probs`` when the caller has it already.
    """
    region = dilate(coarse_tumour(probs) if coarse is None else coarse, dilation)
    if brain is not None:
        region &= np.asarray(brain, dtype=bool)
    return region


def fuse(
    probs: TaskProbabilities,
    brain: np.ndarray | None = None,
    dilation: float = DILATION_VOXELS,
    region: np.ndarray | None = None,
    rule: FusionRule = "argmax",
    thresholds: RegionThresholds | None = None,
) -> np.ndarray:
    """The fused label map (uint8, BraTS 2018 convention) from the three task outputs.

    ``brain`` and ``dilation`` as in :func:`fusion_region`; ``region``: its result when
    the caller has it already (the others are then unused); ``rule``: how task 2
    decides (:data:`FusionRule`); ``thresholds``: where the lines are drawn (default
    0.5 each; the arg-max rule uses only the ET line).
    """
    if rule not in FUSION_RULES:
        raise ValueError(f"fusion rule must be one of {FUSION_RULES}; got {rule!r}")
    if region is None:
        region = fusion_region(probs, brain, dilation)
    lines = thresholds or RegionThresholds()
    p2 = probs.tumour
    if rule == "argmax":
        task2 = np.argmax(p2, axis=0)
        edema = region & (task2 == TaskClass.EDEMA)
        core = region & np.isin(task2, (TaskClass.NCR_NET, TaskClass.ENHANCING))
    else:
        core_p, tumour_p = task2_core_and_tumour(probs)
        if rule == "joint":
            voted = joint_tumour_probability(probs, tumour_p)
            whole = region & (voted > lines.whole)
        else:
            whole = region & (tumour_p > lines.whole)
        core = whole & (core_p > lines.core * tumour_p)
        edema = whole & ~core
    labels = np.zeros(p2.shape[1:], dtype=np.uint8)
    labels[edema] = EDEMA
    enhancing = probs.enhancing[EnhancingClass.ENHANCING] > lines.enhancing
    labels[core & enhancing] = ENHANCING
    labels[core & ~enhancing] = NCR_NET
    return labels


def fused_probabilities(
    probs: TaskProbabilities,
    brain: np.ndarray | None = None,
    dilation: float = DILATION_VOXELS,
    region: np.ndarray | None = None,
    rule: FusionRule = "argmax",
) -> np.ndarray:
    """Per-voxel probabilities of background, NCR/NET, edema and ET (float32, 4 x grid).

    Inside the dilated coarse tumour: background = P2(background) + P2(normal),
    edema = P2(edema), and task 2's core probability P2(NCR/NET) + P2(ET) split by
    task 3 into ET (times P3(ET)) and NCR/NET (times 1 - P3(ET)). Outside it (and
    outside the brain) background is 1. The four channels sum to 1. The other arguments
    as in :func:`fuse`.

    Under the ``joint`` rule the tumour probability is the vote the rule labels by (the
    mean of task 1's and task 2's), shared between edema and core in task 2's
    proportions, so that background below 0.5 is exactly the labelled whole tumour.
    """
    if region is None:
        region = fusion_region(probs, brain, dilation)
    p2, p_et = probs.tumour, probs.enhancing[EnhancingClass.ENHANCING]
    core, tumour = task2_core_and_tumour(probs)
    edema = p2[TaskClass.EDEMA]
    background = p2[TaskClass.BACKGROUND] + p2[TaskClass.NORMAL]
    if rule == "joint":
        voted = joint_tumour_probability(probs, tumour)
        share = np.divide(voted, tumour, out=np.zeros_like(tumour), where=tumour > 0)
        # Where task 2 gives the tumour nothing, the rule labels the vote's tumour edema.
        core, edema = core * share, np.where(tumour > 0, edema * share, voted)
        background = 1.0 - voted
    out = np.zeros((4, *p2.shape[1:]), dtype=np.float32)
    out[0] = np.where(region, background, 1.0)
    out[1] = np.where(region, core * (1.0 - p_et), 0.0)
    out[2] = np.where(region, edema, 0.0)
    out[3] = np.where(region, core * p_et, 0.0)
    return out
