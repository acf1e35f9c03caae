"""The tumour's components: which one is the main lesion, which may be removed, and how
plausible the whole result looks (not in the paper).

:func:`keep_main_lesion` removes tumour components that lie farther than a gap (10 mm
by default) from the main lesion. On cases from sites the model never saw, the distant
components it removed were false positives (a patch of predicted edema, enhancing
tumour at a vessel), which cost Dice and far more HD95. Taking the *largest* component
as the main lesion failed on a scan from an older scanner, where the network marked a
thin bright rim along the brain's edge as a larger "tumour" than the real one and the
real tumour was removed. So here:

* a component shaped like a shell along the brain's outer boundary (most of its voxels
  within :data:`SHELL_MM` of the outside of the brain mask) is *suspect*: it is never
  the main lesion while another component is not suspect;
* the component holding the most voxels the network is confident are tumour core
  (:data:`CONFIDENT_CORE` of the core probability) is never removed.

:func:`assess` measures the signs of a likely failure that a person should review
(a rim along the brain edge, implausible volumes, a large part removed, a brain mask
that does not look like a skull-stripped brain) and gives a ``quality`` block.

All functions are pure, on label maps in the BraTS 2018 convention (0, 1, 2, 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import cc3d
import numpy as np
from scipy import ndimage

from model.defaults import MAIN_LESION_GAP_MM
from model.labels import ENHANCING, NCR_NET

#: Depth (mm) of the band inside the brain mask's outer boundary that counts as its edge.
SHELL_MM = 5.0
#: Share of a component's voxels in that band from which it counts as a shell.
SHELL_FRACTION = 0.6
#: Core probability from which a voxel counts as confident core.
CONFIDENT_CORE = 0.9

CONNECTIVITY = 26


def _spacing(spacing: tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    sp = tuple(float(v) for v in spacing)
    if len(sp) != 3 or not all(math.isfinite(v) and v > 0 for v in sp):
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return (sp[0], sp[1], sp[2])


def edge_depth_mm(brain: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) from each brain voxel to the nearest voxel outside the brain mask
    (the grid's border counts as outside); 0 outside the brain."""
    padded = np.pad(np.asarray(brain, dtype=bool), 1, constant_values=False)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)
    return np.asarray(depth[1:-1, 1:-1, 1:-1], dtype=np.float32)


def near_edge(
    brain: np.ndarray, spacing: tuple[float, float, float], where: np.ndarray, within_mm: float
) -> np.ndarray:
    """Whether each voxel of ``where`` lies within ``within_mm`` of the brain's edge
    (``edge_depth_mm(brain, spacing) <= within_mm`` there; False elsewhere).

    The distances are computed only in the bounding box of ``where`` grown by the
    distance: an outside voxel nearer than that lies in it, so the answer is the one of
    the whole grid, whose distance transform took most of the post-processing's time.
    """
    out = np.zeros(brain.shape, dtype=bool)
    where = np.asarray(where, dtype=bool)
    found = ndimage.find_objects(where.astype(np.uint8))
    if not found or found[0] is None:
        return out
    grow = [math.ceil(within_mm / v) + 1 for v in spacing]
    box = tuple(
        slice(max(0, int(side.start) - g), min(n, int(side.stop) + g))
        for side, g, n in zip(found[0], grow, brain.shape, strict=True)
    )
    # The grid's own border counts as outside, as in edge_depth_mm; a side of the box
    # inside the grid does not: whatever lies beyond it is farther than within_mm.
    pad = [
        (int(side.start == 0), int(side.stop == n))
        for side, n in zip(box, brain.shape, strict=True)
    ]
    crop = np.pad(np.asarray(brain[box], dtype=bool), pad, constant_values=False)
    if crop.all():  # no outside voxel within reach
        return out
    depth = ndimage.distance_transform_edt(crop, sampling=spacing)
    depth = depth[tuple(slice(lo, depth.shape[i] - hi) for i, (lo, hi) in enumerate(pad))]
    out[box] = (depth <= within_mm) & where[box]
    return out


@dataclass(frozen=True)
class Components:
    """The whole tumour's connected components and what is known of each.

    ``ids`` is 0 outside the tumour and 1..N inside; the per-component arrays are
    indexed by id (index 0 is the background and never used).
    """

    ids: np.ndarray
    voxels: np.ndarray
    shell_fraction: np.ndarray  # share of voxels within SHELL_MM of the brain's edge
    confident_core: np.ndarray  # voxels with core probability >= CONFIDENT_CORE

    @property
    def count(self) -> int:
        return len(self.voxels) - 1

    def shells(self) -> np.ndarray:
        out = self.shell_fraction >= SHELL_FRACTION
        out[0] = False
        return out

    def main(self) -> int:
        """The main lesion: the largest component that is not a shell (the largest of
        all when every one is)."""
        sizes = self.voxels.astype(np.float64)
        sizes[0] = -1
        candidates = np.where(self.shells(), -1.0, sizes)
        if candidates.max() <= 0:
            candidates = sizes
        return int(np.argmax(candidates))

    def most_confident_core(self, shells: bool = True) -> int | None:
        """The component with the most confident core voxels (None when none has any);
        ``shells=False``: the one among the components that are not shells, when one of
        them has any."""
        core = self.confident_core.copy()
        core[0] = 0
        if not shells:
            shell = self.shells()
            if core[~shell].max() > 0:
                core[shell] = 0
        if self.count == 0 or core.max() == 0:
            return None
        return int(np.argmax(core))


def components(
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    brain: np.ndarray | None = None,
    core_probability: np.ndarray | None = None,
    connectivity: int = CONNECTIVITY,
) -> Components:
    """The tumour components of ``labels``; shells need ``brain``, confident core needs
    ``core_probability`` (else the voxels labelled NCR/NET or ET count as confident)."""
    conn = cast(Literal[6, 18, 26], connectivity)
    ids, n = cc3d.connected_components(labels != 0, connectivity=conn, return_N=True)
    flat = ids.ravel()
    voxels = np.bincount(flat, minlength=n + 1)
    shell = np.zeros(n + 1, dtype=np.float64)
    if brain is not None and n:
        band = near_edge(brain, spacing, ids != 0, SHELL_MM)
        in_band = np.bincount(flat, weights=band.ravel(), minlength=n + 1)
        shell = in_band / np.maximum(voxels, 1)
    if core_probability is not None:
        confident = np.asarray(core_probability) >= CONFIDENT_CORE
    else:
        confident = np.isin(labels, (NCR_NET, ENHANCING))
    core = np.bincount(flat, weights=confident.ravel(), minlength=n + 1).astype(np.int64)
    return Components(ids, voxels, shell, core)


def keep_main_lesion(
    labels: np.ndarray,
    spacing: tuple[float, ...] | list[float],
    max_gap_mm: float = MAIN_LESION_GAP_MM,
    connectivity: int = CONNECTIVITY,
    *,
    brain: np.ndarray | None = None,
    core_probability: np.ndarray | None = None,
    guard: bool = True,
    spare_shells: bool = False,
) -> tuple[np.ndarray, list[int]]:
    """Removes tumour components far from the main lesion, never the surest core.

    The main lesion is the largest component that is not a shell along the brain's edge
    (see :class:`Components`; without ``brain`` no component is a shell, and the main
    lesion is the largest). Any other component whose nearest voxel is more than
    ``max_gap_mm`` (Euclidean, in mm, voxel centre to voxel centre) from it is set to
    background, except the one with the most confident core voxels among those that are
    not shells (a shell is spared for its core only when no other component holds
    confident core).

    Args:
        labels: 3D label map (BraTS 2018 convention), not modified.
        spacing: voxel size per axis in mm.
        max_gap_mm: the largest gap kept, in mm.
        connectivity: 6, 18 or 26.
        brain: the brain mask on the same grid (to recognise shells).
        core_probability: the network's tumour-core probability on the same grid.
        guard: False: the earlier rule, the largest component is the main lesion and
            any component may be removed (``brain`` and ``core_probability`` unused).
        spare_shells: True: the earlier rule, the component surest of core is spared
            even when it is a shell along the brain's edge (which a rim of false tumour
            holding confident core then keeps).

    Returns:
        ``(new label map, voxel counts of the removed components)``.

    Raises:
        ValueError: ``labels`` is not 3D, or an argument is out of range.
    """
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise ValueError(f"labels must be a 3D label map, got an array of shape {arr.shape}")
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    if not (isinstance(max_gap_mm, int | float) and math.isfinite(max_gap_mm) and max_gap_mm >= 0):
        raise ValueError(f"max_gap_mm must be a finite number >= 0, got {max_gap_mm!r}")
    sp = _spacing(spacing)
    out = np.array(arr, copy=True)
    parts = components(arr, sp, brain if guard else None, core_probability, connectivity)
    if parts.count <= 1:
        return out, []
    main = parts.main()
    far = _far_from(parts.ids, main, len(parts.voxels), sp, max_gap_mm)
    far[0] = far[main] = False
    keep = parts.most_confident_core(spare_shells) if guard else None
    if keep is not None:
        far[keep] = False
    removed = [int(n) for n in parts.voxels[far]]
    if removed:
        out[far[parts.ids]] = 0
    return out, removed


def _far_from(
    ids: np.ndarray, main: int, n: int, sp: tuple[float, float, float], gap_mm: float
) -> np.ndarray:
    """Per component id: whether its nearest voxel lies more than ``gap_mm`` from ``main``."""
    # A voxel more than the gap from the main lesion's bounding box along one axis is
    # farther than the gap: distances are only needed in that box grown by the gap
    # (exact there, since a Euclidean distance ignores what lies between), and a
    # component with no voxel in it is far.
    main_box = ndimage.find_objects(ids, max_label=main)[main - 1]
    grow = [math.floor(gap_mm / v) + 1 for v in sp]
    box = tuple(
        slice(max(0, int(side.start) - g), int(side.stop) + g)
        for side, g in zip(main_box, grow, strict=True)
    )
    near_main = ids[box]
    gap = ndimage.distance_transform_edt(near_main != main, sampling=sp)
    tumour = near_main != 0
    nearest = np.full(n, np.inf)
    np.minimum.at(nearest, near_main[tumour], gap[tumour])
    return nearest > gap_mm


# --------------------------------------------------------------------------- quality

#: Whole-tumour volumes (mL) outside which a result is implausible for a glioma scan.
WT_PLAUSIBLE_ML = (1.0, 350.0)
#: Brain-mask volumes (mL) of a skull-stripped adult brain, with margin.
BRAIN_PLAUSIBLE_ML = (700.0, 2200.0)
#: Share of the tumour in shells along the brain's edge from which a rim is flagged.
RIM_FRACTION = 0.25
#: Overlap (Dice) of task 1's and task 2's whole tumours below which a result is
#: flagged: the coarse and the fine pass disagree on where the tumour is. Chosen by
#: ``bench/quality_flags.py --max-tests 1 --measures task_agreement`` on the out-of-fold
#: results of the bundled recipe's five fold models (width 8, landmarks normalisation,
#: bfloat16, the default inference before the joint fusion): it flagged 3 of their 4
#: results below WT Dice 0.70 and none of the 30 others; chosen fold by fold on the
#: other four folds, 3 of 4 and 1 of 30 in the fold left out. With the joint fusion
#: (the measure does not depend on the fusion, the failures do) the same choice finds
#: the same threshold: 2 of 3 failures and 1 of 31 others flagged, nested 2 of 3 and 2
#: of 31. It replaced a threshold on the mean
#: tumour probability (``confidence``), which did not carry from fold model to fold
#: model of this recipe (chosen on four folds, it flagged all 5 good results of the
#: fifth). A model trained with another recipe may agree with itself more or less:
#: measure it.
TASK_AGREEMENT = 0.589
#: The flag that :data:`TASK_AGREEMENT` trips, as results and the model card name it.
TASK_DISAGREEMENT = "task_disagreement"
#: Whole-tumour probabilities counted as undecided by ``uncertain_fraction``.
UNDECIDED = (0.2, 0.8)


@dataclass
class Quality:
    """Signs of a likely failure, measured on one result.

    Attributes:
        flags: stable names of the signs that tripped (empty: none).
        measures: the figures behind them.
        notes: one sentence per flag, for people.
    """

    flags: list[str] = field(default_factory=list)
    measures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def review_recommended(self) -> bool:
        return bool(self.flags)

    def to_dict(self) -> dict[str, Any]:
        return {
            "review_recommended": self.review_recommended,
            "flags": list(self.flags),
            "measures": {k: round(v, 3) for k, v in self.measures.items()},
            "notes": list(self.notes),
        }

    def warning(self) -> str | None:
        """The one warning a person sees when a sign tripped."""
        if not self.flags:
            return None
        return "review recommended: " + "; ".join(self.notes)


def assess(
    labels: np.ndarray,
    spacing: tuple[float, ...] | list[float],
    brain: np.ndarray,
    removed_voxels: int = 0,
    core_probability: np.ndarray | None = None,
    tumour_probability: np.ndarray | None = None,
    coarse: np.ndarray | None = None,
) -> Quality:
    """Signs of a likely failure in a final label map (on the brain mask's grid).

    ``removed_voxels`` is what post-processing removed from the network's prediction.
    With ``tumour_probability`` (task 2's whole-tumour probability) and ``coarse`` (task
    1's whole tumour) it also measures how sure the network was: ``uncertain_fraction``,
    the brain voxels whose whole-tumour probability lies within :data:`UNDECIDED` per
    labelled tumour voxel; ``confidence``, the mean probability over the labelled tumour;
    and ``task_agreement``, the Dice overlap of task 1's and task 2's whole tumours.
    """
    sp = _spacing(spacing)
    voxel_ml = sp[0] * sp[1] * sp[2] / 1000.0
    parts = components(labels, sp, brain, core_probability)
    tumour = int(parts.voxels[1:].sum())
    shells = parts.shells()
    rim = int(parts.voxels[shells].sum())
    quality = Quality()
    m = quality.measures
    m["wt_ml"] = tumour * voxel_ml
    m["tc_ml"] = float(np.isin(labels, (NCR_NET, ENHANCING)).sum()) * voxel_ml
    m["brain_ml"] = float(np.count_nonzero(brain)) * voxel_ml
    m["components"] = float(parts.count)
    m["rim_fraction"] = rim / tumour if tumour else 0.0
    predicted = tumour + removed_voxels
    m["removed_fraction"] = removed_voxels / predicted if predicted else 0.0
    m["et_ml"] = float(np.count_nonzero(labels == ENHANCING)) * voxel_ml
    if tumour_probability is not None:
        inside = tumour_probability[np.asarray(brain, dtype=bool)]
        undecided = np.count_nonzero((inside >= UNDECIDED[0]) & (inside <= UNDECIDED[1]))
        m["uncertain_fraction"] = undecided / tumour if tumour else 0.0
        m["confidence"] = float(tumour_probability[labels > 0].mean()) if tumour else 0.0
        if coarse is not None:
            fine = tumour_probability > 0.5
            both = np.count_nonzero(fine) + np.count_nonzero(coarse)
            m["task_agreement"] = 2.0 * np.count_nonzero(fine & coarse) / both if both else 1.0

    def flag(name: str, note: str) -> None:
        quality.flags.append(name)
        quality.notes.append(note)

    if m["rim_fraction"] >= RIM_FRACTION:
        flag(
            "rim",
            f"{m['rim_fraction']:.0%} of the tumour lies in thin shells along the brain's edge, "
            "a pattern of scanner artefacts or incomplete skull stripping rather than tumour",
        )
    low, high = WT_PLAUSIBLE_ML
    if not low <= m["wt_ml"] <= high:
        flag(
            "implausible_volume",
            f"the whole tumour measures {m['wt_ml']:.1f} mL, outside the {low:g}-{high:g} mL "
            "of the gliomas this model was trained on",
        )
    if tumour and m.get("task_agreement", 1.0) < TASK_AGREEMENT:
        flag(
            TASK_DISAGREEMENT,
            f"the network's coarse and fine passes disagreed on where the tumour is "
            f"(overlap {m['task_agreement']:.3f}, below {TASK_AGREEMENT:g}), as they did on "
            "most of the results that failed in cross-validation",
        )
    low, high = BRAIN_PLAUSIBLE_ML
    if not low <= m["brain_ml"] <= high:
        flag(
            "brain_mask",
            f"the non-zero voxels measure {m['brain_ml']:.0f} mL, not a skull-stripped adult "
            f"brain ({low:g}-{high:g} mL); check that the input is skull-stripped",
        )
    return quality
