"""Tests for model/evaluation/metrics.py: hand-worked counts, the empty-mask table, HD95
by brute force."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from model.evaluation.metrics import (
    RegionMetrics,
    evaluate_case,
    grid_diagonal_mm,
    hausdorff95,
    region_metrics,
    region_volumes_ml,
    summarise,
    surface,
)
from model.labels import ENHANCING, ENHANCING_2023, REGIONS, LabelError

# --------------------------------------------------------------------------- brute force


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface by the definition: a mask voxel with a face neighbour outside the mask or image."""
    out = np.zeros(mask.shape, dtype=bool)
    steps = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    for idx in zip(*np.nonzero(mask), strict=True):
        for step in steps:
            nb = tuple(i + s for i, s in zip(idx, step, strict=True))
            inside = all(0 <= n < size for n, size in zip(nb, mask.shape, strict=True))
            if not inside or not mask[nb]:
                out[idx] = True
                break
    return out


def brute_hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    """All-pairs surface distances in mm, both directions pooled, linear 95th percentile."""
    sp = np.asarray(spacing, dtype=float)
    pts_p = np.argwhere(brute_surface(pred)) * sp
    pts_g = np.argwhere(brute_surface(ref)) * sp
    dist = np.sqrt(((pts_p[:, None, :] - pts_g[None, :, :]) ** 2).sum(axis=-1))
    pooled = np.concatenate((dist.min(axis=1), dist.min(axis=0)))
    return float(np.percentile(pooled, 95, method="linear"))


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> np.ndarray:
    return rng.random(shape) < density


def random_labels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.choice(np.array([0, 1, 2, ENHANCING], dtype=np.uint8), size=shape)


# --------------------------------------------------------------------------- hand-worked


def test_hand_worked_counts() -> None:
    # Grid 2 x 2 x 3 = 12 voxels.
    ref = np.zeros((2, 2, 3), dtype=bool)
    pred = np.zeros((2, 2, 3), dtype=bool)
    ref[0, 0, :] = True  # G = {(0,0,0), (0,0,1), (0,0,2), (0,1,0)}: |G| = 4
    ref[0, 1, 0] = True
    pred[0, 0, 0:2] = True  # P = {(0,0,0), (0,0,1), (1,1,2)}: |P| = 3
    pred[1, 1, 2] = True
    # TP = 2, FP = 1, FN = 2, TN = 12 - 2 - 1 - 2 = 7.
    m = region_metrics(pred, ref, (1.0, 2.0, 0.5))  # voxel volume 1 mm^3
    assert m.dice == pytest.approx(4 / 7)  # 2 * 2 / (3 + 4)
    assert m.sensitivity == pytest.approx(0.5)  # 2 / (2 + 2)
    assert m.specificity == pytest.approx(7 / 8)  # 7 / (7 + 1)
    assert m.ppv == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert m.volume_pred_ml == pytest.approx(0.003)  # 3 voxels * 1 mm^3 / 1000
    assert m.volume_ref_ml == pytest.approx(0.004)


def test_hand_worked_identical_masks() -> None:
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[1, 1, :] = True
    m = region_metrics(mask, mask, (1.0, 1.0, 1.0))
    # TP = 3, FP = FN = 0, TN = 24.
    assert (m.dice, m.sensitivity, m.specificity, m.ppv, m.hd95) == (1.0, 1.0, 1.0, 1.0, 0.0)


def test_hd95_two_points_anisotropic() -> None:
    # Single voxels 3 steps apart along the last axis at 2 mm: both distances are 6 mm.
    pred = np.zeros((1, 1, 10), dtype=bool)
    ref = np.zeros((1, 1, 10), dtype=bool)
    ref[0, 0, 2] = True
    pred[0, 0, 5] = True
    assert hausdorff95(pred, ref, (1.0, 1.0, 2.0)) == pytest.approx(6.0)


def test_hd95_pools_both_directions() -> None:
    # On a 1 x 1 x 10 line every voxel is on the image border, so all are surface.
    # G = [0:4), P = [0:5). P->G: 0,0,0,0,1; G->P: 0,0,0,0. Pooled, 9 values, sorted:
    # eight 0s then a 1. Linear 95th percentile: position 0.95 * 8 = 7.6 -> 0.6.
    # (The max of the one-way percentiles would be 0.95 * 4 = 3.8 -> 0.8.)
    ref = np.zeros((1, 1, 10), dtype=bool)
    pred = np.zeros((1, 1, 10), dtype=bool)
    ref[0, 0, 0:4] = True
    pred[0, 0, 0:5] = True
    assert hausdorff95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(0.6)
    assert hausdorff95(ref, pred, (1.0, 1.0, 1.0)) == pytest.approx(0.6)


def test_spec_worked_case_is_zero() -> None:
    # 40^3, G = [5:15)^3, P = G + [30:33)^3. Surfaces: |S(G)| = 1000 - 512 = 488,
    # |S(P)| = 488 + 26. Only 26 of 1002 pooled distances are nonzero (2.6% < 5%).
    ref = np.zeros((40, 40, 40), dtype=bool)
    ref[5:15, 5:15, 5:15] = True
    pred = ref.copy()
    pred[30:33, 30:33, 30:33] = True
    assert hausdorff95(pred, ref, (1.0, 1.0, 1.0)) == 0.0
    assert brute_hd95(pred, ref, (1.0, 1.0, 1.0)) == 0.0


# --------------------------------------------------------------------------- HD95 vs brute force


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(1.0, 0.8, 2.5), (0.5, 1.0, 1.0)])
def test_hd95_matches_brute_force_random(seed: int, spacing: tuple[float, ...]) -> None:
    rng = np.random.default_rng(seed)
    shape = (12, 10, 8)
    pred = random_mask(rng, shape, rng.uniform(0.05, 0.5))
    ref = random_mask(rng, shape, rng.uniform(0.05, 0.5))
    assert pred[0].any() or pred[-1].any()  # these masks touch the image border
    assert hausdorff95(pred, ref, spacing) == pytest.approx(brute_hd95(pred, ref, spacing))


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_brute_force_blobs(seed: int) -> None:
    # Solid blocks, one against the border and one inside, so interior voxels exist.
    rng = np.random.default_rng(100 + seed)
    shape = (12, 10, 8)
    spacing = (1.0, 0.8, 2.5)
    pred = np.zeros(shape, dtype=bool)
    ref = np.zeros(shape, dtype=bool)
    lo = rng.integers(0, 3, size=3)
    pred[: lo[0] + 6, lo[1] : lo[1] + 6, lo[2] :] = True  # touches three borders
    hi = rng.integers(2, 5, size=3)
    ref[hi[0] : hi[0] + 5, hi[1] : hi[1] + 4, hi[2] : hi[2] + 3] = True
    ref &= ~random_mask(rng, shape, 0.1)  # holes
    assert hausdorff95(pred, ref, spacing) == pytest.approx(brute_hd95(pred, ref, spacing))


def test_hd95_matches_brute_force_interior_and_disjoint() -> None:
    # Neither mask touches the border, and they do not touch each other: real HD95.
    rng = np.random.default_rng(7)
    spacing = (1.0, 0.8, 2.5)
    pred = np.zeros((12, 10, 8), dtype=bool)
    ref = np.zeros((12, 10, 8), dtype=bool)
    pred[2:5, 2:6, 1:4] = random_mask(rng, (3, 4, 3), 0.7)
    ref[7:11, 5:9, 4:7] = random_mask(rng, (4, 4, 3), 0.7)
    expected = brute_hd95(pred, ref, spacing)
    assert expected < grid_diagonal_mm(pred.shape, spacing)
    assert hausdorff95(pred, ref, spacing) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(4))
def test_surface_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, (12, 10, 8), 0.6)
    np.testing.assert_array_equal(surface(mask), brute_surface(mask))


def test_surface_counts_image_border() -> None:
    full = np.ones((4, 4, 4), dtype=bool)
    s = surface(full)
    assert s.sum() == 64 - 8  # only the 2 x 2 x 2 core is interior
    assert not s[1:3, 1:3, 1:3].any()


# --------------------------------------------------------------------------- empty masks


SHAPE = (3, 4, 5)  # 60 voxels
SPACING = (1.0, 2.0, 3.0)
DIAG = math.sqrt(3.0**2 + 8.0**2 + 15.0**2)  # sqrt(298)


def test_both_empty() -> None:
    empty = np.zeros(SHAPE, dtype=bool)
    m = region_metrics(empty, empty, SPACING)
    assert m == RegionMetrics(
        dice=1.0,
        sensitivity=1.0,
        specificity=1.0,
        ppv=None,
        hd95=0.0,
        volume_pred_ml=0.0,
        volume_ref_ml=0.0,
    )


def test_reference_empty_prediction_not() -> None:
    ref = np.zeros(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    pred[0, 0, :3] = True  # FP = 3, TN = 57
    m = region_metrics(pred, ref, SPACING)
    assert m.dice == 0.0
    assert m.hd95 == pytest.approx(DIAG)
    assert m.sensitivity == 0.0
    assert m.specificity == pytest.approx(57 / 60)
    assert m.ppv == 0.0
    assert m.volume_pred_ml == pytest.approx(3 * 6.0 / 1000)


def test_prediction_empty_reference_not() -> None:
    ref = np.zeros(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    ref[1, 1:3, 1:3] = True  # FN = 4, TN = 56, FP = 0
    m = region_metrics(pred, ref, SPACING)
    assert m.dice == 0.0
    assert m.hd95 == pytest.approx(DIAG)
    assert m.sensitivity == 0.0
    assert m.specificity == 1.0  # computed: 56 / (56 + 0)
    assert m.ppv is None


def test_specificity_undefined_without_negatives() -> None:
    ref = np.ones(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    m = region_metrics(pred, ref, SPACING)
    assert m.specificity is None  # TN + FP = 0


def test_nonempty_non_touching_masks_get_real_hd95() -> None:
    ref = np.zeros(SHAPE, dtype=bool)
    pred = np.zeros(SHAPE, dtype=bool)
    ref[0, 0, 0] = True
    pred[0, 0, 4] = True  # 4 steps of 3 mm
    m = region_metrics(pred, ref, SPACING)
    assert m.hd95 == pytest.approx(12.0)
    assert m.dice == 0.0


def test_grid_diagonal_brats_size() -> None:
    shape = (240, 240, 155)
    ref = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    pred[100:102, 100:102, 70:72] = True
    assert grid_diagonal_mm(shape, (1.0, 1.0, 1.0)) == pytest.approx(373.1287, abs=1e-4)
    assert hausdorff95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(373.1287, abs=1e-4)
    assert hausdorff95(ref, pred, (1.0, 1.0, 1.0)) == pytest.approx(373.1287, abs=1e-4)
    assert hausdorff95(ref, ref, (1.0, 1.0, 1.0)) == 0.0


def test_to_dict_writes_null_for_undefined() -> None:
    empty = np.zeros(SHAPE, dtype=bool)
    d = region_metrics(empty, empty, SPACING).to_dict()
    assert set(d) == {
        "dice",
        "sensitivity",
        "specificity",
        "ppv",
        "hd95",
        "volume_pred_ml",
        "volume_ref_ml",
    }
    assert json.loads(json.dumps(d))["ppv"] is None


# --------------------------------------------------------------------------- label maps


def test_evaluate_case_hand_worked() -> None:
    ref = np.zeros((2, 2, 2), dtype=np.uint8)
    pred = np.zeros((2, 2, 2), dtype=np.uint8)
    ref[0, 0] = [ENHANCING, 1]  # WT 3, TC 2, ET 1
    ref[0, 1, 0] = 2
    pred[0, 0] = [ENHANCING, 2]  # WT 2, TC 1, ET 1
    result = evaluate_case(pred, ref, (1.0, 1.0, 1.0))
    assert list(result) == list(REGIONS)
    assert result["WT"].dice == pytest.approx(4 / 5)  # TP 2: 2 * 2 / (2 + 3)
    assert result["TC"].dice == pytest.approx(2 / 3)  # TP 1: 2 * 1 / (1 + 2)
    assert result["ET"].dice == 1.0
    assert result["WT"].specificity == 1.0  # TN 5, FP 0


def test_et3_convention_matches_et4() -> None:
    rng = np.random.default_rng(3)
    ref4 = random_labels(rng, (12, 10, 8))
    pred4 = random_labels(rng, (12, 10, 8))
    ref3 = np.where(ref4 == ENHANCING, ENHANCING_2023, ref4).astype(np.uint8)
    pred3 = np.where(pred4 == ENHANCING, ENHANCING_2023, pred4).astype(np.uint8)
    spacing = (1.0, 0.8, 2.5)
    expected = evaluate_case(pred4, ref4, spacing)
    assert evaluate_case(pred3, ref3, spacing) == expected
    assert evaluate_case(pred3, ref4, spacing, pred_et_label=3, ref_et_label=4) == expected
    assert region_volumes_ml(pred3, spacing) == region_volumes_ml(pred4, spacing)


def test_invalid_label_raises() -> None:
    ref = np.zeros((3, 3, 3), dtype=np.uint8)
    pred = ref.copy()
    pred[1, 1, 1] = 5
    with pytest.raises(LabelError):
        evaluate_case(pred, ref, (1.0, 1.0, 1.0))
    with pytest.raises(LabelError):
        evaluate_case(ref, pred, (1.0, 1.0, 1.0))
    with pytest.raises(LabelError):
        region_volumes_ml(pred, (1.0, 1.0, 1.0))


def test_shape_mismatch_names_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, 3, 3\).*\(3, 3, 4\)"):
        evaluate_case(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        hausdorff95(np.zeros((3, 3)), np.zeros((3, 4)), (1.0, 1.0))


@pytest.mark.parametrize(
    "spacing",
    [(1.0, 1.0), (1.0, 1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1, math.inf, 1)],
)
def test_bad_spacing_raises(spacing: tuple[float, ...]) -> None:
    labels = np.zeros((3, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(labels, labels, spacing)
    with pytest.raises(ValueError, match="spacing"):
        region_volumes_ml(labels, spacing)


def test_region_volumes_ml_hand_worked() -> None:
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, :] = [1, 2, 2, ENHANCING]  # WT 4, TC 2, ET 1 voxels
    vols = region_volumes_ml(labels, (2.0, 2.0, 2.5))  # 10 mm^3 per voxel
    assert vols == pytest.approx({"WT": 0.04, "TC": 0.02, "ET": 0.01})


# --------------------------------------------------------------------------- summary, purity


def _metrics(dice: float, ppv: float | None) -> RegionMetrics:
    return RegionMetrics(
        dice=dice,
        sensitivity=1.0,
        specificity=1.0,
        ppv=ppv,
        hd95=2.0,
        volume_pred_ml=1.0,
        volume_ref_ml=3.0,
    )


def test_summarise_ignores_undefined() -> None:
    cases = {
        "a": {"WT": _metrics(0.5, None), "ET": _metrics(1.0, None)},
        "b": {"WT": _metrics(1.0, 0.25)},
        "c": {"WT": _metrics(0.0, 0.75)},
    }
    summary = summarise(cases)
    assert list(summary) == ["WT", "ET"]
    assert summary["WT"]["dice"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3
    assert summary["WT"]["ppv"] == pytest.approx(0.5)  # (0.25 + 0.75) / 2, None left out
    assert summary["WT"]["hd95"] == pytest.approx(2.0)
    assert summary["ET"]["dice"] == 1.0
    assert summary["ET"]["ppv"] is None  # no defined value
    assert summarise({}) == {}


def test_summarise_of_evaluate_case() -> None:
    rng = np.random.default_rng(11)
    cases = {
        f"case{i}": evaluate_case(
            random_labels(rng, (6, 5, 4)), random_labels(rng, (6, 5, 4)), (1.0, 1.0, 1.0)
        )
        for i in range(3)
    }
    summary = summarise(cases)
    wt_dice = [cases[c]["WT"].dice for c in cases]
    assert summary["WT"]["dice"] == pytest.approx(sum(wt_dice) / 3)


def test_inputs_unmodified() -> None:
    rng = np.random.default_rng(5)
    pred_labels = random_labels(rng, (12, 10, 8))
    ref_labels = np.where(random_labels(rng, (12, 10, 8)) == ENHANCING, ENHANCING_2023, 1).astype(
        np.int32
    )
    pred_mask = random_mask(rng, (12, 10, 8), 0.3)
    ref_mask = random_mask(rng, (12, 10, 8), 0.3)
    spacing = [1.0, 0.8, 2.5]
    saved = [a.copy() for a in (pred_labels, ref_labels, pred_mask, ref_mask)]

    evaluate_case(pred_labels, ref_labels, spacing)
    region_volumes_ml(ref_labels, spacing)
    region_metrics(pred_mask, ref_mask, spacing)
    hausdorff95(pred_mask, ref_mask, spacing)
    s = surface(pred_mask)

    assert s is not pred_mask
    assert spacing == [1.0, 0.8, 2.5]
    for before, after in zip(saved, (pred_labels, ref_labels, pred_mask, ref_mask), strict=True):
        assert after.dtype == before.dtype
        np.testing.assert_array_equal(after, before)


def test_non_bool_masks_accepted() -> None:
    rng = np.random.default_rng(9)
    pred = random_mask(rng, (6, 5, 4), 0.4)
    ref = random_mask(rng, (6, 5, 4), 0.4)
    spacing = (1.0, 0.8, 2.5)
    as_bool = region_metrics(pred, ref, spacing)
    as_int = region_metrics(pred.astype(np.uint8) * 7, ref.astype(np.int64), spacing)
    assert as_int == as_bool


def test_hd95_symmetric() -> None:
    rng = np.random.default_rng(12)
    for _ in range(3):
        a = random_mask(rng, (12, 10, 8), 0.2)
        b = random_mask(rng, (12, 10, 8), 0.2)
        assert hausdorff95(a, b, (1.0, 0.8, 2.5)) == hausdorff95(b, a, (1.0, 0.8, 2.5))


def test_brute_force_helpers_agree_on_cube() -> None:
    # Guard on the brute force itself: a 3^3 cube inside a 5^3 grid has 26 surface voxels.
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[1:4, 1:4, 1:4] = True
    assert brute_surface(mask).sum() == 26
    assert all(brute_surface(mask)[i, j, k] for i, j, k in itertools.product((1, 3), repeat=3))
    assert not brute_surface(mask)[2, 2, 2]
