"""Tests for model/inference/fusion.py on hand-set task probabilities.

Probabilities are dyadic fractions where a threshold is tested (0.5, 0.5 + 2**-10, ...)
so that float32 sums are exact and "exactly 0.5" really is 0.5.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.inference.fusion import (
    DILATION_VOXELS,
    FUSED_CHANNEL_LABELS,
    FUSION_RULES,
    RegionThresholds,
    coarse_tumour,
    dilate,
    fuse,
    fused_probabilities,
    fusion_region,
)
from model.inference.tiling import TaskProbabilities
from model.labels import EDEMA, ENHANCING, NCR_NET, TaskClass

EPS = 2.0**-10


def _onehot(cls: int, n: int) -> np.ndarray:
    p = np.zeros(n, np.float32)
    p[cls] = 1.0
    return p


def _probs(
    shape=(15, 15, 15),
    coarse: int = TaskClass.NORMAL,
    tumour: int = TaskClass.NORMAL,
    p_et: float = 0.0,
) -> TaskProbabilities:
    """Every voxel certain of one class per task; task 3's P(ET) = ``p_et``."""
    return TaskProbabilities(
        coarse=np.broadcast_to(_onehot(coarse, 5)[:, None, None, None], (5, *shape)).copy(),
        tumour=np.broadcast_to(_onehot(tumour, 5)[:, None, None, None], (5, *shape)).copy(),
        enhancing=np.stack(
            [np.full(shape, 1.0 - p_et, np.float32), np.full(shape, p_et, np.float32)]
        ),
    )


def _set(volume: np.ndarray, voxel, values) -> None:
    volume[(slice(None), *voxel)] = np.asarray(values, np.float32)


def _ball(shape, centre, radius: float) -> np.ndarray:
    """Voxels whose Euclidean distance to ``centre`` is at most ``radius`` (brute force)."""
    grid = np.indices(shape)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return d2 <= radius**2


def _random_probs(shape=(10, 9, 8), seed: int = 0) -> TaskProbabilities:
    """Random probabilities of every class, drawn per voxel from a flat Dirichlet."""
    rng = np.random.default_rng(seed)
    return TaskProbabilities(
        *(
            rng.dirichlet(np.ones(c), size=shape).astype(np.float32).transpose(3, 0, 1, 2)
            for c in (5, 5, 2)
        )
    )


# --------------------------------------------------------------------------------------
# Task 1: the coarse whole tumour


def test_coarse_tumour_needs_merged_probability_above_half():
    probs = _probs(shape=(3, 1, 1))
    # merged tumour = 0.25 + 0.125 + 0.125 = 0.5 exactly: not tumour.
    _set(probs.coarse, (0, 0, 0), [0.25, 0.25, 0.25, 0.125, 0.125])
    # merged = 0.5 + EPS: tumour, although no single tumour class beats "normal".
    _set(probs.coarse, (1, 0, 0), [0.0, 0.5 - EPS, 0.25, 0.25 + EPS, 0.0])
    # each tumour class small, but together 0.75.
    _set(probs.coarse, (2, 0, 0), [0.125, 0.125, 0.25, 0.25, 0.25])
    np.testing.assert_array_equal(coarse_tumour(probs)[:, 0, 0], [False, True, True])


@pytest.mark.parametrize(("merged", "expected_voxels"), [(0.5, 0), (0.5 + EPS, 515)])
def test_exactly_half_gives_no_tumour_in_fuse(merged, expected_voxels):
    probs = _probs(tumour=TaskClass.EDEMA)  # task 2 would call every voxel edema
    _set(probs.coarse, (7, 7, 7), [0.0, 1.0 - merged, merged, 0.0, 0.0])
    labels = fuse(probs)
    # 515 = lattice points of a ball of radius 5 (x^2 + y^2 + z^2 <= 25).
    assert int(np.count_nonzero(labels)) == expected_voxels
    assert set(np.unique(labels)) <= {0, EDEMA}


# --------------------------------------------------------------------------------------
# Dilation by 5 voxels


def test_dilation_radius_five_by_hand():
    shape, centre = (15, 15, 15), (7, 7, 7)
    probs = _probs(shape, tumour=TaskClass.EDEMA)
    _set(probs.coarse, centre, _onehot(TaskClass.ENHANCING, 5))
    labels = fuse(probs)
    inside = {
        (12, 7, 7): "5 along X",
        (7, 2, 7): "5 along -Y",
        (10, 11, 7): "(3, 4, 0): 5",
        (7, 10, 3): "(0, 3, -4): 5",
        (10, 10, 9): "(3, 3, 2): sqrt(22)",
        (9, 9, 11): "(2, 2, 4): sqrt(24)",
    }
    outside = {
        (13, 7, 7): "6 along X",
        (11, 10, 8): "(4, 3, 1): sqrt(26)",
        (10, 10, 10): "(3, 3, 3): sqrt(27)",
        (12, 8, 7): "(5, 1, 0): sqrt(26)",
        (11, 11, 7): "(4, 4, 0): sqrt(32)",
    }
    for voxel, why in inside.items():
        assert labels[voxel] == EDEMA, why
    for voxel, why in outside.items():
        assert labels[voxel] == 0, why
    np.testing.assert_array_equal(labels == EDEMA, _ball(shape, centre, DILATION_VOXELS))
    assert int(np.count_nonzero(labels)) == 515


def test_dilation_at_the_grid_corner():
    shape = (9, 9, 9)
    probs = _probs(shape, tumour=TaskClass.EDEMA)
    _set(probs.coarse, (0, 0, 0), _onehot(TaskClass.NCR_NET, 5))
    labels = fuse(probs)
    assert labels[5, 0, 0] == EDEMA and labels[3, 4, 0] == EDEMA and labels[0, 0, 5] == EDEMA
    assert labels[6, 0, 0] == 0 and labels[4, 3, 1] == 0
    np.testing.assert_array_equal(labels == EDEMA, _ball(shape, (0, 0, 0), 5))


def test_dilation_of_two_separate_seeds_and_other_radii():
    shape = (30, 12, 12)
    mask = np.zeros(shape, bool)
    mask[3, 5, 5] = mask[25, 6, 6] = True
    for radius in (1, 2.5, 5):
        expected = _ball(shape, (3, 5, 5), radius) | _ball(shape, (25, 6, 6), radius)
        np.testing.assert_array_equal(dilate(mask, radius), expected)
    assert np.count_nonzero(dilate(mask, 1)) == 2 * 7  # centre + 6 face neighbours


def test_dilate_returns_a_new_array():
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 2, 2] = True
    for radius in (0, 3):
        out = dilate(mask, radius)
        assert out is not mask
        out[:] = True
        assert np.count_nonzero(mask) == 1
    empty = np.zeros((4, 4, 4), bool)
    assert not dilate(empty, 5).any()


def test_dilation_argument_of_fuse():
    probs = _probs(tumour=TaskClass.EDEMA)
    _set(probs.coarse, (7, 7, 7), _onehot(TaskClass.EDEMA, 5))
    assert int(np.count_nonzero(fuse(probs, dilation=0))) == 1
    assert int(np.count_nonzero(fuse(probs, dilation=1))) == 7
    np.testing.assert_array_equal(fuse(probs, dilation=3) == EDEMA, _ball((15,) * 3, (7,) * 3, 3))


# --------------------------------------------------------------------------------------
# Task 2 inside the dilated region, task 3 inside task 2's core


def test_task2_labels_outside_the_dilated_region_are_dropped():
    probs = _probs()
    _set(probs.coarse, (2, 7, 7), _onehot(TaskClass.EDEMA, 5))
    for voxel, cls in {
        (4, 7, 7): TaskClass.NCR_NET,  # distance 2: kept
        (7, 7, 7): TaskClass.EDEMA,  # distance 5: kept
        (8, 7, 7): TaskClass.EDEMA,  # distance 6: dropped
        (13, 7, 7): TaskClass.NCR_NET,  # distance 11: dropped
        (2, 7, 1): TaskClass.ENHANCING,  # distance 6: dropped
    }.items():
        _set(probs.tumour, voxel, _onehot(cls, 5))
    labels = fuse(probs)
    expected = np.zeros(labels.shape, np.uint8)
    expected[4, 7, 7] = NCR_NET
    expected[7, 7, 7] = EDEMA
    np.testing.assert_array_equal(labels, expected)


def test_task2_background_and_normal_are_not_tumour():
    probs = _probs(coarse=TaskClass.ENHANCING)  # whole grid is coarse tumour
    probs.tumour[:] = 0
    probs.tumour[TaskClass.BACKGROUND, :7] = 1.0
    probs.tumour[TaskClass.NORMAL, 7:] = 1.0
    assert not fuse(probs).any()


def test_task3_decides_et_only_inside_task2_core():
    shape = (8, 1, 1)
    probs = _probs(shape, coarse=TaskClass.EDEMA)
    cases = [
        # (task 2 class, P3(ET), expected label)
        (TaskClass.EDEMA, 0.9, EDEMA),  # edema never becomes ET
        (TaskClass.NORMAL, 0.9, 0),  # nor does normal tissue
        (TaskClass.NCR_NET, 0.9, ENHANCING),  # task 2's NCR/NET turned ET by task 3
        (TaskClass.ENHANCING, 0.1, NCR_NET),  # task 2's ET turned NCR/NET by task 3
        (TaskClass.ENHANCING, 0.5, NCR_NET),  # exactly 0.5: not ET
        (TaskClass.NCR_NET, 0.5 + EPS, ENHANCING),
        (TaskClass.ENHANCING, 0.5 + EPS, ENHANCING),
        (TaskClass.BACKGROUND, 1.0, 0),
    ]
    for x, (cls, p_et, _) in enumerate(cases):
        _set(probs.tumour, (x, 0, 0), _onehot(cls, 5))
        _set(probs.enhancing, (x, 0, 0), [1.0 - p_et, p_et])
    labels = fuse(probs)
    np.testing.assert_array_equal(labels[:, 0, 0], [want for _, _, want in cases])


def test_task3_outside_the_region_changes_nothing():
    probs = _probs(tumour=TaskClass.NCR_NET, p_et=0.9)  # task 1 sees no tumour anywhere
    assert not fuse(probs).any()


def test_task2_ties_break_towards_lower_class():
    shape = (3, 1, 1)
    probs = _probs(shape, coarse=TaskClass.NCR_NET, p_et=0.0)
    _set(probs.tumour, (0, 0, 0), [0.0, 0.5, 0.0, 0.5, 0.0])  # normal vs edema -> normal
    _set(probs.tumour, (1, 0, 0), [0.0, 0.0, 0.5, 0.5, 0.0])  # NCR vs edema -> NCR/NET
    _set(probs.tumour, (2, 0, 0), [0.0, 0.0, 0.0, 0.5, 0.5])  # edema vs ET -> edema
    np.testing.assert_array_equal(fuse(probs)[:, 0, 0], [0, NCR_NET, EDEMA])


def test_brain_mask_excludes_tumour():
    probs = _probs(coarse=TaskClass.EDEMA, tumour=TaskClass.NCR_NET, p_et=0.75)
    brain = np.zeros((15, 15, 15), bool)
    brain[3:12, 2:9, 5:] = True
    labels = fuse(probs, brain)
    np.testing.assert_array_equal(labels, np.where(brain, ENHANCING, 0))
    fused = fused_probabilities(probs, brain)
    np.testing.assert_array_equal(fused[0, ~brain], 1.0)
    np.testing.assert_array_equal(fused[1:, ~brain], 0.0)
    np.testing.assert_allclose(fused[:, brain].T, [[0.0, 0.25, 0.0, 0.75]] * int(brain.sum()))


def test_label_map_type_and_values():
    shape = (10, 9, 8)
    labels = fuse(_random_probs(shape))
    assert labels.dtype == np.uint8 and labels.shape == shape
    assert set(np.unique(labels)) <= {0, NCR_NET, EDEMA, ENHANCING}
    assert len(np.unique(labels)) == 4  # random probabilities give every label


# --------------------------------------------------------------------------------------
# Fused probabilities


def test_fused_probabilities_by_hand():
    shape = (15, 15, 15)
    probs = _probs(shape)
    _set(probs.coarse, (7, 7, 7), _onehot(TaskClass.NCR_NET, 5))
    inside, outside = (9, 7, 7), (7, 7, 13)  # distance 2 and 6
    for voxel in (inside, outside):
        _set(probs.tumour, voxel, [0.1, 0.2, 0.3, 0.25, 0.15])
        _set(probs.enhancing, voxel, [0.4, 0.6])
    fused = fused_probabilities(probs)
    assert fused.shape == (4, *shape) and fused.dtype == np.float32
    # background = 0.1 + 0.2; core = 0.3 + 0.15 = 0.45 split 0.4 / 0.6 by task 3.
    np.testing.assert_allclose(fused[(slice(None), *inside)], [0.3, 0.18, 0.25, 0.27], atol=1e-6)
    np.testing.assert_array_equal(fused[(slice(None), *outside)], [1.0, 0.0, 0.0, 0.0])
    # Elsewhere in the region task 2 says "normal" with certainty.
    np.testing.assert_array_equal(fused[:, 7, 7, 7], [1.0, 0.0, 0.0, 0.0])
    assert FUSED_CHANNEL_LABELS == (0, NCR_NET, EDEMA, ENHANCING)


def test_fused_probabilities_sum_to_one_and_match_formula():
    probs = _random_probs()
    brain = np.ones(probs.coarse.shape[1:], bool)
    brain[0] = False
    fused = fused_probabilities(probs, brain)
    np.testing.assert_allclose(fused.sum(axis=0), 1.0, atol=1e-6)
    assert fused.min() >= 0.0
    region = dilate(coarse_tumour(probs), DILATION_VOXELS) & brain
    assert region.any() and (~region).any()
    p2, p_et = probs.tumour, probs.enhancing[1]
    core = p2[2] + p2[4]
    expected = np.stack([p2[0] + p2[1], core * (1 - p_et), p2[3], core * p_et])
    np.testing.assert_allclose(fused[:, region], expected[:, region], atol=1e-6)
    np.testing.assert_array_equal(fused[0, ~region], 1.0)
    np.testing.assert_array_equal(fused[1:, ~region], 0.0)


def test_a_region_given_is_the_region_used():
    probs = _random_probs(seed=2, shape=(16, 15, 14))
    brain = np.ones(probs.coarse.shape[1:], bool)
    brain[:3] = False
    region = fusion_region(probs, brain)
    np.testing.assert_array_equal(region, dilate(coarse_tumour(probs), DILATION_VOXELS) & brain)
    np.testing.assert_array_equal(fuse(probs, region=region), fuse(probs, brain))
    np.testing.assert_array_equal(
        fused_probabilities(probs, region=region), fused_probabilities(probs, brain)
    )
    # Given, it is used as it is: nothing is labelled outside it.
    corner = np.zeros_like(region)
    corner[:5, :5, :5] = region[:5, :5, :5]
    assert corner.any() and (region & ~corner).any()
    assert not fuse(probs, region=corner)[~corner].any()
    np.testing.assert_array_equal(fused_probabilities(probs, region=corner)[0, ~corner], 1.0)


# --------------------------------------------------------------------------------------
# The region-by-region rule


def test_regions_rule_labels_a_split_tumour_probability_by_hand():
    probs = _probs(shape=(3, 3, 3), coarse=TaskClass.EDEMA, p_et=0.25)
    p2 = probs.tumour
    # Order: background, normal, NCR/NET, edema, ET.
    # 0.375 background, 0.3125 edema, 0.3125 core (split): arg-max background; tumour
    # 0.625 > 0.5 and core 0.3125 not above edema 0.3125: edema.
    _set(p2, (0, 0, 0), [0.375, 0.0, 0.15625, 0.3125, 0.15625])
    # Same tumour, core 0.375 above edema 0.25: core (NCR/NET, P(ET) 0.25).
    _set(p2, (1, 1, 1), [0.375, 0.0, 0.1875, 0.25, 0.1875])
    # Tumour exactly 0.5: not tumour, whatever its split.
    _set(p2, (2, 2, 2), [0.25, 0.25, 0.125, 0.25, 0.125])
    # Arg-max edema (0.4375) but core 0.5 above it: core under the region rule.
    _set(p2, (0, 2, 1), [0.0625, 0.0, 0.25, 0.4375, 0.25])
    assert np.allclose(p2.sum(axis=0), 1.0)
    argmax = fuse(probs, rule="argmax")
    regions = fuse(probs, rule="regions")
    assert argmax[0, 0, 0] == 0 and regions[0, 0, 0] == EDEMA
    assert argmax[1, 1, 1] == 0 and regions[1, 1, 1] == NCR_NET
    assert argmax[2, 2, 2] == 0 and regions[2, 2, 2] == 0
    assert argmax[0, 2, 1] == EDEMA and regions[0, 2, 1] == NCR_NET
    # Everywhere else every voxel is certain normal tissue: no tumour under either rule.
    others = np.ones((3, 3, 3), bool)
    others[0, 0, 0] = others[1, 1, 1] = others[2, 2, 2] = others[0, 2, 1] = False
    assert not argmax[others].any() and not regions[others].any()


@pytest.mark.parametrize("seed", range(3))
def test_regions_rule_keeps_the_region_nesting_and_the_dilated_region(seed):
    probs = _random_probs(seed=seed, shape=(14, 13, 12))
    brain = np.ones(probs.coarse.shape[1:], bool)
    brain[:, :2] = False
    region = fusion_region(probs, brain)
    labels = fuse(probs, region=region, rule="regions")
    p2 = probs.tumour
    core_p = p2[TaskClass.NCR_NET] + p2[TaskClass.ENHANCING]
    whole = region & (core_p + p2[TaskClass.EDEMA] > 0.5)
    np.testing.assert_array_equal(labels > 0, whole)
    core = whole & (core_p > p2[TaskClass.EDEMA])
    np.testing.assert_array_equal(np.isin(labels, (NCR_NET, ENHANCING)), core)
    np.testing.assert_array_equal(labels == ENHANCING, core & (probs.enhancing[1] > 0.5))
    # Arg-max and region rule differ somewhere on random probabilities (else the test
    # would not tell them apart).
    assert (fuse(probs, region=region) != labels).any()
    assert not labels[~region].any()


def test_an_unknown_fusion_rule_is_refused():
    assert FUSION_RULES == ("argmax", "regions", "joint")
    with pytest.raises(ValueError, match="fusion rule"):
        fuse(_random_probs(), rule="vote")  # type: ignore[arg-type]


def test_inputs_are_not_modified():
    probs = _random_probs(seed=1)
    brain = np.zeros(probs.coarse.shape[1:], bool)
    brain[2:8, 1:7, 1:6] = True
    before = [a.copy() for a in probs]
    brain_before = brain.copy()
    mask = coarse_tumour(probs)
    mask_before = mask.copy()
    fuse(probs, brain)
    fused_probabilities(probs, brain)
    dilate(mask, 5)
    for a, b in zip(probs, before, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(brain, brain_before)
    np.testing.assert_array_equal(mask, mask_before)


def test_region_rule_lines_move_whole_tumour_core_and_enhancing():
    """Each line of :class:`RegionThresholds` moves its own decision and no other."""
    probs = _probs((2, 2, 2), coarse=TaskClass.EDEMA)
    p2 = probs.tumour
    # Tumour 0.4375, below 0.5 and above 0.375; core share 0.25 / 0.4375 = 0.571.
    _set(p2, (0, 0, 0), [0.5625, 0.0, 0.125, 0.1875, 0.125])
    # Tumour 0.75, core share 0.3125 / 0.75 = 0.417: edema at 0.5, core at 0.375.
    _set(p2, (1, 1, 1), [0.25, 0.0, 0.1875, 0.4375, 0.125])
    probs.enhancing[:, 1, 1, 1] = [0.5625, 0.4375]  # P(ET) 0.4375
    default = fuse(probs, rule="regions")
    assert default[0, 0, 0] == 0 and default[1, 1, 1] == EDEMA
    wider = fuse(probs, rule="regions", thresholds=RegionThresholds(whole=0.375))
    assert wider[0, 0, 0] == NCR_NET and wider[1, 1, 1] == EDEMA
    more_core = fuse(probs, rule="regions", thresholds=RegionThresholds(core=0.375))
    assert more_core[0, 0, 0] == 0 and more_core[1, 1, 1] == NCR_NET
    both = RegionThresholds(core=0.375, enhancing=0.375)
    assert fuse(probs, rule="regions", thresholds=both)[1, 1, 1] == ENHANCING
    # The ET line holds for the arg-max rule too; the others do not touch it.
    argmax_core = _probs((2, 2, 2), coarse=TaskClass.EDEMA, tumour=TaskClass.NCR_NET, p_et=0.4375)
    assert (fuse(argmax_core) == NCR_NET).all()
    lines = RegionThresholds(whole=0.9, core=0.9, enhancing=0.375)
    assert (fuse(argmax_core, thresholds=lines) == ENHANCING).all()


@pytest.mark.parametrize("seed", range(2))
def test_lower_lines_only_grow_the_whole_tumour_and_the_core(seed):
    probs = _random_probs(seed=seed, shape=(12, 11, 10))
    high = fuse(probs, rule="regions")
    low = fuse(probs, rule="regions", thresholds=RegionThresholds(whole=0.35, core=0.35))
    assert (low > 0)[high > 0].all() and (low > 0).sum() > (high > 0).sum()
    core_high, core_low = np.isin(high, (NCR_NET, ENHANCING)), np.isin(low, (NCR_NET, ENHANCING))
    assert core_low[core_high].all() and core_low.sum() > core_high.sum()


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_region_thresholds_must_lie_strictly_between_0_and_1(value):
    for field in ("whole", "core", "enhancing"):
        with pytest.raises(ValueError, match=field):
            RegionThresholds(**{field: value})


def test_joint_rule_votes_the_whole_tumour_with_both_tasks():
    """Whole tumour where the mean of task 1's and task 2's tumour probabilities exceeds
    the line; core inside it as the region rule decides."""
    probs = _probs((2, 2, 2))
    p1, p2 = probs.coarse, probs.tumour
    # Task 1 sure (0.75), task 2 unsure (0.375, all core): mean 0.5625, tumour.
    _set(p1, (0, 0, 0), [0.25, 0.0, 0.25, 0.25, 0.25])
    _set(p2, (0, 0, 0), [0.625, 0.0, 0.375, 0.0, 0.0])
    # Task 2 says edema (0.625), task 1 says normal tissue (0.25 tumour): mean 0.4375.
    _set(p1, (1, 1, 1), [0.0, 0.75, 0.0, 0.25, 0.0])
    _set(p2, (1, 1, 1), [0.375, 0.0, 0.0, 0.625, 0.0])
    regions, joint = fuse(probs, rule="regions"), fuse(probs, rule="joint")
    assert regions[0, 0, 0] == 0 and joint[0, 0, 0] == NCR_NET
    assert regions[1, 1, 1] == EDEMA and joint[1, 1, 1] == 0
    lower = fuse(probs, rule="joint", thresholds=RegionThresholds(whole=0.375))
    assert lower[1, 1, 1] == EDEMA
    assert np.count_nonzero(joint) == 1 and np.count_nonzero(regions) == 1


@pytest.mark.parametrize("seed", range(3))
def test_joint_probabilities_decode_to_the_joint_labels(seed):
    """Under the joint rule the fused probabilities sum to 1 and their regions are the
    labels: background below 0.5 is the whole tumour, core above edema the core, ET
    above NCR/NET the enhancing tumour."""
    probs = _random_probs(seed=seed, shape=(14, 13, 12))
    probs.tumour[:, 0, 0, 0] = [0.5, 0.5, 0.0, 0.0, 0.0]  # task 2 sees no tumour at all
    probs.coarse[:, 0, 0, 0] = [0.0, 0.0, 0.0, 1.0, 0.0]  # task 1 is sure: vote 0.5
    probs.coarse[:, 0, 0, 1] = [0.0, 0.0, 0.0, 1.0, 0.0]
    probs.tumour[:, 0, 0, 1] = [0.25, 0.5, 0.0, 0.0, 0.25]  # vote 0.625, all of it ET
    region = fusion_region(probs)
    labels = fuse(probs, region=region, rule="joint")
    fused = fused_probabilities(probs, region=region, rule="joint")
    np.testing.assert_allclose(fused.sum(axis=0), 1.0, atol=1e-6)
    assert (fused >= -1e-7).all()
    np.testing.assert_array_equal(labels > 0, fused[0] < 0.5)
    core = fused[1] + fused[3]
    np.testing.assert_array_equal(
        np.isin(labels, (NCR_NET, ENHANCING)), (labels > 0) & (core > fused[2])
    )
    np.testing.assert_array_equal(
        labels == ENHANCING, np.isin(labels, (NCR_NET, ENHANCING)) & (fused[3] > fused[1])
    )
    assert labels[0, 0, 0] == 0 and fused[0, 0, 0, 0] == 0.5
    # The arg-max rule's probabilities are task 2's, as before.
    np.testing.assert_array_equal(
        fused_probabilities(probs, region=region),
        fused_probabilities(probs, region=region, rule="argmax"),
    )
