"""The main-lesion rule that cannot delete the tumour, and the quality flags, on
synthetic brains: an ellipsoid brain mask, a compact tumour inside, a thin bright rim
along the brain's edge (the failure seen on an older scanner's scan)."""

from __future__ import annotations

import numpy as np
import pytest

from model.inference.lesions import (
    SHELL_FRACTION,
    TASK_AGREEMENT,
    assess,
    components,
    edge_depth_mm,
    keep_main_lesion,
)
from model.labels import EDEMA, ENHANCING, NCR_NET

SPACING = (1.0, 1.0, 1.0)
SHAPE = (120, 140, 110)


def _brain() -> np.ndarray:
    grid = np.indices(SHAPE).astype(np.float32)
    centre = np.array(SHAPE, dtype=np.float32)[:, None, None, None] / 2
    radii = np.array([55, 65, 50], dtype=np.float32)[:, None, None, None]
    return (((grid - centre) / radii) ** 2).sum(0) <= 1.0


def _ball(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE)
    return ((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2


@pytest.fixture(scope="module")
def brain() -> np.ndarray:
    return _brain()


@pytest.fixture(scope="module")
def rim_and_tumour(brain) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels with a rim (3 mm thick, front and back of the brain; larger than the
    tumour, some core in it) and a tumour (edema, core, enhancing) deep inside."""
    depth = edge_depth_mm(brain, SPACING)
    labels = np.zeros(SHAPE, np.uint8)
    y = np.indices(SHAPE)[1]
    rim = brain & (depth <= 3) & ((y < 40) | (y > 100))
    labels[rim] = EDEMA
    labels[rim & (np.indices(SHAPE)[0] % 7 == 0)] = NCR_NET  # core labels in the rim
    tumour = _ball((60, 75, 55), 18) & brain
    labels[tumour] = EDEMA
    labels[_ball((60, 75, 55), 10)] = NCR_NET
    labels[_ball((60, 75, 55), 10) & ~_ball((60, 75, 55), 7)] = ENHANCING
    core_probability = np.where(np.isin(labels, (NCR_NET, ENHANCING)), 0.6, 0.1)
    core_probability[_ball((60, 75, 55), 10)] = 0.97  # the network is sure of this core
    return labels, tumour, core_probability.astype(np.float32)


def test_edge_depth_is_zero_outside_and_grows_inwards(brain):
    depth = edge_depth_mm(brain, SPACING)
    assert (depth[~brain] == 0).all()
    assert depth[60, 70, 55] > 40
    assert 0 < depth[60, 70, 6] <= 2  # one voxel inside the bottom of the ellipsoid


def test_a_rim_along_the_brain_edge_is_a_shell_and_the_tumour_is_not(brain, rim_and_tumour):
    labels, tumour, core = rim_and_tumour
    parts = components(labels, SPACING, brain, core)
    tumour_id = int(np.bincount(parts.ids[tumour]).argmax())
    shells = parts.shells()
    assert not shells[tumour_id]
    assert shells.sum() >= 1
    rim_ids = [i for i in range(1, parts.count + 1) if i != tumour_id]
    assert all(parts.shell_fraction[i] >= SHELL_FRACTION for i in rim_ids)
    assert parts.voxels[rim_ids].sum() > parts.voxels[tumour_id]  # larger than the tumour


def test_the_tumour_survives_a_larger_rim(brain, rim_and_tumour):
    labels, tumour, core = rim_and_tumour
    # Without the brain the largest component (a rim) is the main lesion: the tumour,
    # 10+ mm away, would be removed - unless it holds the surest core.
    kept, _ = keep_main_lesion(labels, SPACING, brain=brain, core_probability=core)
    np.testing.assert_array_equal(kept[tumour], labels[tumour])
    kept_no_core, _ = keep_main_lesion(labels, SPACING, brain=brain)
    np.testing.assert_array_equal(kept_no_core[tumour], labels[tumour])


def test_the_component_most_confident_of_core_is_never_removed(brain):
    labels = np.zeros(SHAPE, np.uint8)
    big = _ball((60, 50, 55), 16) & brain
    labels[big] = EDEMA  # the largest: edema only
    small = _ball((60, 100, 55), 6)
    labels[small] = NCR_NET  # 30+ mm away, but the network is sure of its core
    core = np.where(small, 0.95, 0.2).astype(np.float32)
    kept, removed = keep_main_lesion(labels, SPACING, brain=brain, core_probability=core)
    assert kept[small].all() and kept[big].all() and removed == []
    unsure = np.where(small, 0.6, 0.2).astype(np.float32)
    kept, removed = keep_main_lesion(labels, SPACING, brain=brain, core_probability=unsure)
    assert not kept[small].any() and removed == [int(small.sum())]


def test_a_rim_surest_of_core_goes_unless_shells_are_spared(brain, rim_and_tumour):
    """A part of the rim whose core the network is surer of than the tumour's (the
    failure of a landmarks-normalised model on one case) is removed by default: the
    tumour is the one spared. With ``spare_shells=True`` (the earlier rule) that part of
    the rim is spared as well. A shell that is the only component with confident core is
    spared under either rule."""
    labels, tumour, _ = rim_and_tumour
    parts = components(labels, SPACING, brain)
    rim = parts.shells()[parts.ids]
    assert rim.any() and not (rim & tumour).any()
    core = np.where(rim & (labels == NCR_NET), 0.99, 0.1).astype(np.float32)
    core[_ball((60, 75, 55), 4)] = 0.95  # some confident core in the tumour, less of it
    assert (core[rim] >= 0.9).sum() > (core[tumour] >= 0.9).sum()
    with_core = components(labels, SPACING, brain, core)
    surest = with_core.most_confident_core()
    assert surest is not None and with_core.shells()[surest]  # a part of the rim
    assert with_core.most_confident_core(shells=False) == with_core.ids[60, 75, 55]
    kept, removed = keep_main_lesion(labels, SPACING, brain=brain, core_probability=core)
    np.testing.assert_array_equal(kept[tumour], labels[tumour])
    assert not kept[rim].any()
    assert sum(removed) == int(rim.sum())
    spared, _ = keep_main_lesion(
        labels, SPACING, brain=brain, core_probability=core, spare_shells=True
    )
    np.testing.assert_array_equal(spared[tumour], labels[tumour])
    assert spared[with_core.ids == surest].all()
    # No confident core outside the rim: the rim holds the only sure core and is spared.
    only_rim = np.where(rim & (labels == NCR_NET), 0.99, 0.1).astype(np.float32)
    spared, _ = keep_main_lesion(labels, SPACING, brain=brain, core_probability=only_rim)
    assert spared[rim].any()


def test_quality_flags_the_rim_and_not_a_clean_result(brain, rim_and_tumour):
    labels, tumour, core = rim_and_tumour
    flagged = assess(labels, SPACING, brain, 0, core)
    assert "rim" in flagged.flags and flagged.review_recommended
    assert flagged.measures["rim_fraction"] > 0.5
    assert "review recommended" in str(flagged.warning())
    clean = np.where(tumour, labels, 0).astype(np.uint8)
    quality = assess(clean, SPACING, brain, 0, core)
    assert quality.flags == [], quality.to_dict()
    assert quality.warning() is None
    assert quality.to_dict()["review_recommended"] is False


def test_quality_flags_implausible_volumes_and_brain_masks_and_measures_removals(brain):
    labels = np.zeros(SHAPE, np.uint8)
    assert "implausible_volume" in assess(labels, SPACING, brain).flags  # no tumour
    labels[_ball((60, 75, 55), 15) & brain] = EDEMA
    quality = assess(labels, SPACING, brain, removed_voxels=int((labels > 0).sum()))
    # Measured, not flagged: out of fold, large removals were mostly right.
    assert quality.flags == [] and quality.measures["removed_fraction"] == pytest.approx(0.5)
    not_stripped = np.ones(SHAPE, bool)  # the whole head: no skull stripping
    assert "brain_mask" in assess(labels, (1.5, 1.5, 1.5), not_stripped).flags


def test_near_edge_on_the_tumours_box_equals_the_whole_grids_distances():
    """near_edge computes distances only around the voxels asked about; on random
    brains (touching the grid's border or not, filling it or not), spacings and voxel
    sets it gives what the whole-grid edge_depth_mm gives."""
    from model.inference.lesions import SHELL_MM, near_edge

    rng = np.random.default_rng(0)
    for trial in range(30):
        shape = tuple(int(v) for v in rng.integers(12, 40, 3))
        grid = np.ogrid[: shape[0], : shape[1], : shape[2]]
        centre = np.array(shape) / 2
        radius = rng.uniform(4, min(shape) / 1.4)
        brain = sum(((g - c) * w) ** 2 for g, c, w in zip(grid, centre, (1, 1, 1.3), strict=True))
        brain = brain < radius**2
        if trial % 5 == 0:
            brain = np.ones(shape, bool)
        where = rng.random(shape) < 0.02
        if trial % 3 == 0:
            where = np.zeros(shape, bool)
            where[tuple(int(rng.integers(0, s)) for s in shape)] = True
        spacing = tuple(float(v) for v in rng.uniform(0.5, 2.5, 3))
        expected = (edge_depth_mm(brain, spacing) <= SHELL_MM) & where
        np.testing.assert_array_equal(near_edge(brain, spacing, where, SHELL_MM), expected)
    assert not near_edge(brain, spacing, np.zeros(shape, bool), SHELL_MM).any()


def test_quality_measures_how_sure_the_network_was(brain):
    labels = np.zeros(SHAPE, np.uint8)
    tumour = _ball((60, 75, 55), 12) & brain
    labels[tumour] = EDEMA
    sure = np.where(tumour, 0.95, 0.02).astype(np.float32)
    crisp = assess(labels, SPACING, brain, tumour_probability=sure, coarse=tumour).measures
    assert crisp["uncertain_fraction"] == 0.0
    assert crisp["confidence"] == pytest.approx(0.95)
    assert crisp["task_agreement"] == pytest.approx(1.0)
    # A halo as large as the tumour where the network could not decide, and a task 1
    # that saw only half of it.
    halo = _ball((60, 75, 55), 16) & brain & ~tumour
    unsure = np.where(tumour, 0.6, np.where(halo, 0.4, 0.02)).astype(np.float32)
    half = tumour & (np.indices(SHAPE)[0] < 60)
    vague = assess(labels, SPACING, brain, tumour_probability=unsure, coarse=half).measures
    expected = (np.count_nonzero(tumour) + np.count_nonzero(halo)) / np.count_nonzero(tumour)
    assert vague["uncertain_fraction"] == pytest.approx(expected)
    assert vague["confidence"] == pytest.approx(0.6)
    fine, part = np.count_nonzero(tumour), np.count_nonzero(half)
    assert vague["task_agreement"] == pytest.approx(2 * part / (fine + part))
    assert (
        vague["et_ml"] == 0.0
        and "uncertain_fraction" not in assess(labels, SPACING, brain).measures
    )


def test_quality_flags_tasks_that_disagree_on_the_tumour(brain):
    labels = np.zeros(SHAPE, np.uint8)
    tumour = _ball((60, 75, 55), 12) & brain
    labels[tumour] = EDEMA
    probability = np.where(tumour, 0.9, 0.0).astype(np.float32)
    fine = np.count_nonzero(tumour)
    for agreement, flagged in ((TASK_AGREEMENT - 0.02, True), (TASK_AGREEMENT + 0.02, False)):
        # Task 1's tumour: the first `part` voxels of task 2's, in x order.
        part = round(agreement * fine / (2 - agreement))
        order = np.argsort(np.where(tumour, np.indices(SHAPE)[0], SHAPE[0]), axis=None)
        coarse = np.zeros(SHAPE, bool)
        coarse.flat[order[:part]] = True
        quality = assess(labels, SPACING, brain, tumour_probability=probability, coarse=coarse)
        assert quality.measures["task_agreement"] == pytest.approx(agreement, abs=1e-3)
        assert ("task_disagreement" in quality.flags) is flagged, quality.to_dict()
        assert quality.review_recommended is flagged
    # Unsure of its tumour, the tasks agreeing: no flag (confidence is measured, not judged).
    unsure = np.where(tumour, 0.55, 0.0).astype(np.float32)
    calm = assess(labels, SPACING, brain, tumour_probability=unsure, coarse=tumour)
    assert calm.flags == [] and calm.measures["confidence"] == pytest.approx(0.55)
    # Nothing labelled: implausible_volume says so, task_disagreement has nothing to judge.
    empty = assess(np.zeros(SHAPE, np.uint8), SPACING, brain, tumour_probability=probability)
    assert empty.flags == ["implausible_volume"]
