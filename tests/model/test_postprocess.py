"""Tests for model/inference/postprocess.py on tiny hand-built volumes."""

from __future__ import annotations

import numpy as np
import pytest

from model.inference.lesions import keep_main_lesion
from model.inference.postprocess import postprocess, relabel_edema_kmeans, remove_small_components
from model.labels import EDEMA, ENHANCING, NCR_NET

T1CE = 1


def _block(labels: np.ndarray, corner: tuple[int, int, int], size: tuple[int, int, int], value):
    """Writes ``value`` into the box at ``corner`` of extent ``size``; returns its mask."""
    mask = np.zeros(labels.shape, dtype=bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = True
    labels[mask] = value
    return mask


def _fill_tumour(
    labels: np.ndarray,
    images: np.ndarray,
    mask: np.ndarray,
    n_et: int,
    n_ncr: int = 0,
    dark_channels: dict[int, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels the voxels of ``mask``: ``n_et`` ET, then ``n_ncr`` NCR/NET, the rest edema.

    Edema voxels alternate between a dark and a bright group; the dark group gets the
    offsets ``dark_channels`` (default: T1ce -2) and the bright group their negation.

    Returns:
        ``(dark, bright)``: boolean masks of the two edema groups.
    """
    offsets = dark_channels if dark_channels is not None else {T1CE: -2.0}
    idx = np.flatnonzero(mask)
    flat = labels.reshape(-1)
    flat[idx[:n_et]] = ENHANCING
    flat[idx[n_et : n_et + n_ncr]] = NCR_NET
    edema = idx[n_et + n_ncr :]
    flat[edema] = EDEMA
    dark, bright = np.zeros(labels.shape, bool), np.zeros(labels.shape, bool)
    dark.reshape(-1)[edema[0::2]] = True
    bright.reshape(-1)[edema[1::2]] = True
    for channel, offset in offsets.items():
        images[channel][dark] += offset
        images[channel][bright] -= offset
    return dark, bright


def _noise(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.1, (4, *shape)).astype(np.float32)


def _assert_dark_relabelled(out, labels, dark, bright):
    np.testing.assert_array_equal(out[dark], NCR_NET)
    np.testing.assert_array_equal(out[bright], EDEMA)
    changed = out != labels
    np.testing.assert_array_equal(labels[changed], EDEMA)
    np.testing.assert_array_equal(changed, dark)


# --------------------------------------------------------------------------------------
# Step 1: small-component removal


def test_removes_component_below_fraction_of_largest():
    labels = np.zeros((14, 12, 12), np.uint8)
    big = _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)  # 1000 voxels -> tau = 100
    labels[2:4, 2:4, 2:4] = ENHANCING
    labels[5, 5, 5] = NCR_NET
    small = _block(labels, (12, 0, 0), (2, 5, 5), ENHANCING)  # 50 voxels
    out = remove_small_components(labels)
    np.testing.assert_array_equal(out[small], 0)
    np.testing.assert_array_equal(out[big], labels[big])
    assert out.dtype == labels.dtype


@pytest.mark.parametrize(("extent", "kept"), [((4, 5, 5), True), ((1, 9, 11), False)])
def test_component_at_tau_kept_just_below_removed(extent, kept):
    labels = np.zeros((16, 12, 12), np.uint8)
    _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)  # tau = 0.1 * 1000 = 100
    small = _block(labels, (12, 0, 0), extent, NCR_NET)  # 100 or 99 voxels
    assert small.sum() == (100 if kept else 99)
    out = remove_small_components(labels)
    np.testing.assert_array_equal(out[small], NCR_NET if kept else 0)


def test_tau_capped_by_max_size():
    # V_max = 22500, so fraction gives 2250 and tau = max_size = 2000.
    labels = np.zeros((52, 30, 25), np.uint8)
    big = _block(labels, (0, 0, 0), (30, 30, 25), EDEMA)
    at_tau = _block(labels, (32, 0, 0), (20, 10, 10), EDEMA)  # 2000 voxels
    below = _block(labels, (32, 12, 0), (20, 10, 10), EDEMA)
    labels[32, 12, 0] = 0
    below[32, 12, 0] = False  # 1999 voxels
    assert below.sum() == 1999
    out = remove_small_components(labels)
    np.testing.assert_array_equal(out[big | at_tau], EDEMA)
    np.testing.assert_array_equal(out[below], 0)


def test_max_size_argument():
    labels = np.zeros((20, 12, 12), np.uint8)
    _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)
    mid = _block(labels, (12, 0, 0), (2, 5, 5), EDEMA)  # 50 voxels
    tiny = _block(labels, (15, 0, 0), (1, 4, 5), EDEMA)  # 20 voxels
    out = remove_small_components(labels, max_size=30)  # tau = min(30, 100)
    np.testing.assert_array_equal(out[mid], EDEMA)
    np.testing.assert_array_equal(out[tiny], 0)


def test_fraction_argument():
    labels = np.zeros((14, 12, 12), np.uint8)
    _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)
    small = _block(labels, (12, 0, 0), (2, 5, 5), EDEMA)  # 50 voxels
    np.testing.assert_array_equal(remove_small_components(labels, fraction=0.05)[small], EDEMA)
    np.testing.assert_array_equal(remove_small_components(labels, fraction=0.051)[small], 0)


@pytest.mark.parametrize(("connectivity", "kept"), [(26, True), (18, False), (6, False)])
def test_corner_touching_voxels_depend_on_connectivity(connectivity, kept):
    labels = np.zeros((16, 16, 16), np.uint8)
    _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)
    # Touches the cube only at the corner (9, 9, 9) - (10, 10, 10).
    small = _block(labels, (10, 10, 10), (5, 5, 2), ENHANCING)
    out = remove_small_components(labels, connectivity=connectivity)
    np.testing.assert_array_equal(out[small], ENHANCING if kept else 0)


@pytest.mark.parametrize(("connectivity", "kept"), [(18, True), (6, False)])
def test_edge_touching_voxels_depend_on_connectivity(connectivity, kept):
    labels = np.zeros((16, 16, 12), np.uint8)
    _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)
    # Shares the edge x = 9 -> 10, y = 9 -> 10 with the cube, no face.
    small = _block(labels, (10, 10, 0), (5, 5, 2), ENHANCING)
    out = remove_small_components(labels, connectivity=connectivity)
    np.testing.assert_array_equal(out[small], ENHANCING if kept else 0)


def test_single_component_and_empty_map_unchanged():
    labels = np.zeros((6, 6, 6), np.uint8)
    out = remove_small_components(labels)
    np.testing.assert_array_equal(out, labels)
    assert out is not labels
    labels[2, 2, 2] = ENHANCING
    np.testing.assert_array_equal(remove_small_components(labels), labels)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"connectivity": 4}, "connectivity"),
        ({"connectivity": 8}, "connectivity"),
        ({"max_size": -1}, "max_size"),
        ({"fraction": -0.1}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"fraction": float("nan")}, "fraction"),
    ],
)
def test_remove_small_components_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        remove_small_components(np.zeros((4, 4, 4), np.uint8), **kwargs)


def test_remove_small_components_rejects_2d_labels():
    with pytest.raises(ValueError, match="labels"):
        remove_small_components(np.zeros((4, 4), np.uint8))


# --------------------------------------------------------------------------------------
# Step 2: K-means relabelling of edema


def test_dark_edema_becomes_ncr_net():
    shape = (12, 12, 12)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box = _block(labels, (1, 1, 1), (10, 10, 10), EDEMA)
    dark, bright = _fill_tumour(labels, images, box, n_et=20, n_ncr=30)  # ET/WT = 0.02
    out = relabel_edema_kmeans(labels, images)
    _assert_dark_relabelled(out, labels, dark, bright)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[labels == ENHANCING], ENHANCING)
    np.testing.assert_array_equal(out[labels == NCR_NET], NCR_NET)
    np.testing.assert_array_equal(out[labels == 0], 0)


def test_dark_group_named_by_t1ce_not_other_channels():
    # The group dark in T1ce is bright in FLAIR; t1ce_channel decides which is NCR/NET.
    shape = (12, 12, 12)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box = _block(labels, (1, 1, 1), (10, 10, 10), EDEMA)
    dark, bright = _fill_tumour(labels, images, box, n_et=0, dark_channels={T1CE: -2, 3: 2})
    _assert_dark_relabelled(relabel_edema_kmeans(labels, images), labels, dark, bright)
    out = relabel_edema_kmeans(labels, images, t1ce_channel=3)
    _assert_dark_relabelled(out, labels, bright, dark)


@pytest.mark.parametrize(("n_et_b", "changes"), [(100, False), (99, True)])
def test_global_ratio_boundary(n_et_b, changes):
    # Component A: 900 voxels, no ET (component conditions hold). Component B: 100
    # voxels, 100 or 99 ET. Case ET/WT = 100/1000 = 0.1 (not < 0.1) or 0.099.
    shape = (18, 12, 12)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box_a = _block(labels, (1, 1, 1), (9, 10, 10), EDEMA)
    dark, bright = _fill_tumour(labels, images, box_a, n_et=0)
    box_b = _block(labels, (12, 1, 1), (5, 5, 4), NCR_NET)
    labels.reshape(-1)[np.flatnonzero(box_b)[:n_et_b]] = ENHANCING
    out = relabel_edema_kmeans(labels, images)
    if changes:
        _assert_dark_relabelled(out, labels, dark, bright)
    else:
        np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize(("n_et", "changes"), [(50, False), (49, True)])
def test_component_ratio_boundary(n_et, changes):
    # One 1000-voxel component: ET/WT = 0.05 (not < 0.05) or 0.049; case ratio < 0.1.
    shape = (12, 12, 12)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box = _block(labels, (1, 1, 1), (10, 10, 10), EDEMA)
    dark, bright = _fill_tumour(labels, images, box, n_et=n_et)
    out = relabel_edema_kmeans(labels, images)
    if changes:
        _assert_dark_relabelled(out, labels, dark, bright)
    else:
        np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize(("n_et", "changes"), [(1000, False), (999, True)])
def test_component_et_volume_boundary(n_et, changes):
    # One 25000-voxel component: ET/WT = 0.04, below both ratios; ET = 1000 or 999.
    shape = (27, 27, 42)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box = _block(labels, (1, 1, 1), (25, 25, 40), EDEMA)
    dark, bright = _fill_tumour(labels, images, box, n_et=n_et)
    out = relabel_edema_kmeans(labels, images)
    if changes:
        _assert_dark_relabelled(out, labels, dark, bright)
    else:
        np.testing.assert_array_equal(out, labels)


def test_conditions_are_per_component():
    # A: no ET, relabelled. B: ET/WT = 0.06, left alone. Case ET/WT = 60/2000.
    shape = (23, 12, 12)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box_a = _block(labels, (1, 1, 1), (10, 10, 10), EDEMA)
    dark, bright = _fill_tumour(labels, images, box_a, n_et=0)
    box_b = _block(labels, (12, 1, 1), (10, 10, 10), EDEMA)
    _fill_tumour(labels, images, box_b, n_et=60)
    out = relabel_edema_kmeans(labels, images)
    _assert_dark_relabelled(out, labels, dark, bright)


@pytest.mark.parametrize(("connectivity", "changes"), [(26, False), (6, True)])
def test_relabel_components_follow_connectivity(connectivity, changes):
    # A (1000 voxels, no ET) touches B (100 ET voxels) at a corner. Case ET/WT =
    # 100/1100 < 0.1. Joined (26): component ratio 0.09, no change; apart (6): A has 0.
    shape = (18, 18, 18)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box_a = _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)
    dark, bright = _fill_tumour(labels, images, box_a, n_et=0)
    _block(labels, (10, 10, 10), (5, 5, 4), ENHANCING)
    out = relabel_edema_kmeans(labels, images, connectivity=connectivity)
    if changes:
        _assert_dark_relabelled(out, labels, dark, bright)
    else:
        np.testing.assert_array_equal(out, labels)


def test_single_edema_voxel_and_empty_tumour_unchanged():
    shape = (12, 12, 12)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    out = relabel_edema_kmeans(labels, images)
    np.testing.assert_array_equal(out, labels)
    assert out is not labels
    _block(labels, (1, 1, 1), (10, 10, 10), NCR_NET)
    labels[5, 5, 5] = EDEMA
    np.testing.assert_array_equal(relabel_edema_kmeans(labels, images), labels)


def test_relabel_is_reproducible():
    shape = (12, 12, 12)
    labels = np.zeros(shape, np.uint8)
    _block(labels, (1, 1, 1), (10, 10, 10), EDEMA)
    images = np.random.default_rng(3).normal(size=(4, *shape))  # no clear groups
    first = relabel_edema_kmeans(labels, images, random_state=7)
    np.testing.assert_array_equal(first, relabel_edema_kmeans(labels, images, random_state=7))
    assert (first == NCR_NET).any()


@pytest.mark.parametrize(
    ("images_shape", "kwargs", "argument"),
    [
        ((4, 6, 6, 5), {}, "images"),
        ((6, 6, 6), {}, "images"),
        ((4, 6, 6, 6), {"t1ce_channel": 4}, "t1ce_channel"),
        ((4, 6, 6, 6), {"t1ce_channel": -1}, "t1ce_channel"),
        ((4, 6, 6, 6), {"connectivity": 8}, "connectivity"),
        ((4, 6, 6, 6), {"global_ratio": -0.1}, "global_ratio"),
        ((4, 6, 6, 6), {"component_ratio": 2.0}, "component_ratio"),
        ((4, 6, 6, 6), {"max_component_et": -1}, "max_component_et"),
    ],
)
def test_relabel_rejects_bad_arguments(images_shape, kwargs, argument):
    labels = np.zeros((6, 6, 6), np.uint8)
    with pytest.raises(ValueError, match=argument):
        relabel_edema_kmeans(labels, np.zeros(images_shape, np.float32), **kwargs)


def test_relabel_rejects_non_finite_edema_intensities():
    shape = (12, 12, 12)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box = _block(labels, (1, 1, 1), (10, 10, 10), EDEMA)
    _fill_tumour(labels, images, box, n_et=0)
    images[0, 5, 5, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        relabel_edema_kmeans(labels, images)


# --------------------------------------------------------------------------------------
# Both steps


def _two_step_case():
    shape = (14, 12, 12)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box = _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)
    dark, bright = _fill_tumour(labels, images, box, n_et=10)
    small = _block(labels, (12, 0, 0), (2, 5, 5), ENHANCING)  # 50 < tau = 100
    return labels, images, dark, bright, small


def test_postprocess_runs_both_steps():
    labels, images, dark, bright, small = _two_step_case()
    out = postprocess(labels, images)
    np.testing.assert_array_equal(out[small], 0)
    np.testing.assert_array_equal(out[dark], NCR_NET)
    np.testing.assert_array_equal(out[bright], EDEMA)
    expected = relabel_edema_kmeans(remove_small_components(labels), images)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(("remove_small", "relabel_edema"), [(True, False), (False, True)])
def test_postprocess_steps_switch_separately(remove_small, relabel_edema):
    labels, images, dark, _, small = _two_step_case()
    out = postprocess(labels, images, remove_small=remove_small, relabel_edema=relabel_edema)
    np.testing.assert_array_equal(out[small], 0 if remove_small else ENHANCING)
    np.testing.assert_array_equal(out[dark], NCR_NET if relabel_edema else EDEMA)


def test_postprocess_switched_off_is_identity():
    labels, images, *_ = _two_step_case()
    out = postprocess(labels, images, remove_small=False, relabel_edema=False)
    np.testing.assert_array_equal(out, labels)
    assert not np.shares_memory(out, labels)


def test_inputs_not_modified():
    labels, images, *_ = _two_step_case()
    labels_before, images_before = labels.copy(), images.copy()
    outputs = [
        postprocess(labels, images),
        remove_small_components(labels),
        relabel_edema_kmeans(labels, images),
    ]
    np.testing.assert_array_equal(labels, labels_before)
    np.testing.assert_array_equal(images, images_before)
    for out in outputs:
        assert not np.array_equal(out, labels)
        assert not np.shares_memory(out, labels)


@pytest.mark.parametrize(
    ("images_shape", "kwargs", "argument"),
    [
        ((4, 6, 6, 5), {}, "images"),
        ((4, 6, 6, 6), {"connectivity": 10}, "connectivity"),
    ],
)
def test_postprocess_rejects_bad_arguments(images_shape, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        postprocess(np.zeros((6, 6, 6), np.uint8), np.zeros(images_shape), **kwargs)


def test_guard_relabels_only_components_that_hold_core():
    # Two separate tumours without ET: A is edema only (a typical far false positive),
    # B has some NCR/NET. The paper relabels both; the guard only B.
    shape = (30, 14, 14)
    labels, images = np.zeros(shape, np.uint8), _noise(shape)
    box_a = _block(labels, (0, 0, 0), (10, 10, 10), EDEMA)
    dark_a, _ = _fill_tumour(labels, images, box_a, n_et=0)
    box_b = _block(labels, (18, 0, 0), (10, 10, 10), EDEMA)
    dark_b, bright_b = _fill_tumour(labels, images, box_b, n_et=0, n_ncr=50)

    paper = relabel_edema_kmeans(labels, images)
    assert (paper[dark_a] == NCR_NET).all() and (paper[dark_b] == NCR_NET).all()

    guarded = relabel_edema_kmeans(labels, images, require_core=True)
    np.testing.assert_array_equal(guarded[box_a], labels[box_a])
    np.testing.assert_array_equal(guarded[dark_b], NCR_NET)
    np.testing.assert_array_equal(guarded[bright_b], EDEMA)
    assert (postprocess(labels, images, relabel_guard=True) == guarded).all()


# --------------------------------------------------------------------------------------
# keep_main_lesion (not in the paper)


def _three_lesions(gap_near: int, gap_far: int, axis: int = 0) -> tuple[np.ndarray, dict]:
    """A 10^3 main lesion and two 3^3 ones whose nearest voxel is ``gap_near`` voxel
    steps from the main one along ``axis`` and ``gap_far`` along the next axis."""
    labels = np.zeros((60, 60, 60), np.uint8)
    masks = {"main": _block(labels, (2, 2, 2), (10, 10, 10), EDEMA)}
    masks["main"] |= _block(labels, (5, 5, 5), (3, 3, 3), ENHANCING)
    for name, gap, along in (("near", gap_near, axis), ("far", gap_far, (axis + 1) % 3)):
        corner = [2, 2, 2]
        corner[along] = 11 + gap
        masks[name] = _block(labels, tuple(corner), (3, 3, 3), ENHANCING)
    return labels, masks


def test_keep_main_lesion_removes_only_far_components():
    labels, masks = _three_lesions(gap_near=4, gap_far=20)
    before = labels.copy()
    out, removed = keep_main_lesion(labels, (1.0, 1.0, 1.0), max_gap_mm=10.0)
    np.testing.assert_array_equal(labels, before)  # input untouched
    assert removed == [27]
    assert not out[masks["far"]].any()
    np.testing.assert_array_equal(out[~masks["far"]], labels[~masks["far"]])
    assert out.dtype == labels.dtype


def test_keep_main_lesion_measures_the_gap_in_mm_along_each_axis():
    # 8 voxel steps: 8 mm at 1 mm, 16 mm at 2 mm along the axis of the gap only
    for axis in range(3):
        labels, masks = _three_lesions(gap_near=8, gap_far=30, axis=axis)
        kept, _ = keep_main_lesion(labels, (1.0, 1.0, 1.0))
        assert kept[masks["near"]].all()
        spacing = [1.0, 1.0, 1.0]
        spacing[axis] = 2.0
        out, removed = keep_main_lesion(labels, tuple(spacing))
        assert not out[masks["near"]].any() and not out[masks["far"]].any()
        assert removed == [27, 27]
        other = [1.0, 1.0, 1.0]
        other[(axis + 2) % 3] = 2.0
        out, removed = keep_main_lesion(labels, tuple(other))
        assert out[masks["near"]].all() and removed == [27]


def test_keep_main_lesion_keeps_a_component_exactly_at_the_gap():
    labels, masks = _three_lesions(gap_near=10, gap_far=11)  # 10 and 11 mm apart
    out, removed = keep_main_lesion(labels, (1.0, 1.0, 1.0), max_gap_mm=10.0)
    assert out[masks["near"]].all()
    assert not out[masks["far"]].any() and removed == [27]


def test_keep_main_lesion_leaves_one_or_no_component_alone():
    empty = np.zeros((8, 8, 8), np.uint8)
    out, removed = keep_main_lesion(empty, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(out, empty)
    assert removed == []
    one = empty.copy()
    _block(one, (1, 1, 1), (3, 3, 3), NCR_NET)
    out, removed = keep_main_lesion(one, (1.0, 1.0, 1.0), max_gap_mm=0.0)
    np.testing.assert_array_equal(out, one)
    assert removed == []


def test_keep_main_lesion_commutes_with_small_component_removal():
    labels, _ = _three_lesions(gap_near=3, gap_far=25)
    new = _block(labels, (40, 40, 40), (20, 20, 20), EDEMA)  # now the largest, far from all
    first = remove_small_components(keep_main_lesion(labels, (1.0, 1.0, 1.0))[0])
    second = keep_main_lesion(remove_small_components(labels), (1.0, 1.0, 1.0))[0]
    np.testing.assert_array_equal(first, second)
    # The new largest is the main lesion; the old one holds the most core and stays.
    assert first[new].all()
    assert set(np.unique(first).tolist()) == {0, EDEMA, ENHANCING}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_gap_mm": -1.0}, "max_gap_mm"),
        ({"max_gap_mm": float("nan")}, "max_gap_mm"),
        ({"spacing": (1.0, 1.0)}, "spacing"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"connectivity": 4}, "connectivity"),
    ],
)
def test_keep_main_lesion_rejects_bad_arguments(kwargs, argument):
    call = {"spacing": (1.0, 1.0, 1.0), **kwargs}
    with pytest.raises(ValueError, match=argument):
        keep_main_lesion(np.zeros((4, 4, 4), np.uint8), **call)
