"""Tests for model/inference/tiling.py: coverage of the tiling and placement of the predictions.

The placement tests use a fake network whose scores are a voxel-wise function of its
input, so the probabilities the Predictor should return can be computed directly on the
whole volume and compared voxel by voxel.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F_
from torch import nn

from model.defaults import DEFAULT_TILING, TILING_NAMES
from model.inference.tiling import (
    FAST_TILING,
    PAPER_TILING,
    TILINGS,
    TTA_FLIPS,
    TTA_PASSES,
    WIDE_TILING,
    Predictor,
    TaskProbabilities,
    TileLayout,
    from_network,
    resolve_device,
    to_network,
)
from model.net.network import ArchConfig, TaskOutputs, build_model

#: A layout with the kept block flush against the patch's start along X and its end
#: along Y and Z, to exercise extreme offsets.
SKEWED_TILING = TileLayout(patch=(8, 16, 8), kept=(3, 5, 2), offset=(0, 11, 6))
LAYOUTS = {
    "paper": PAPER_TILING,
    "wide": WIDE_TILING,
    "fast": FAST_TILING,
    "skewed": SKEWED_TILING,
}
SHAPES = [(45, 37, 23), (20, 20, 5), (7, 50, 11), (1, 1, 1), (40, 40, 10)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads that spin-wait for
    each other run these tiny convolutions 10x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _coverage(layout: TileLayout, shape, mask=None) -> np.ndarray:
    """How many kept blocks cover each voxel of a grid of ``shape``."""
    count = np.zeros(shape, dtype=np.int32)
    for origin in layout.kept_origins(shape, mask):
        count[tuple(slice(o, o + k) for o, k in zip(origin, layout.kept, strict=True))] += 1
    return count


def _blob_mask(shape, scatter: int = 3, seed: int = 0) -> np.ndarray:
    """An off-centre ellipsoid plus ``scatter`` random voxels; leaves some tiles empty."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    centre = np.array(shape) * 0.35
    semi = np.maximum(np.array(shape) * 0.25, 1.0)
    mask = np.sum(((grid - centre[:, None, None, None]) / semi[:, None, None, None]) ** 2, 0) <= 1
    flat = mask.reshape(-1)
    flat[rng.choice(flat.size, size=min(scatter, flat.size), replace=False)] = True
    return mask


# --------------------------------------------------------------------------------------
# TileLayout geometry


def test_paper_layout_numbers_by_hand():
    # 45 = 2*20 + 5 -> 3 tiles; 37 -> 2 tiles; 23 = 4*5 + 3 -> 5 tiles.
    assert PAPER_TILING.grid((45, 37, 23)) == (3, 2, 5)
    # before = offset; after = tiles*kept + (patch - kept - offset) - size.
    assert PAPER_TILING.padding((45, 37, 23)) == [
        (6, 60 + 6 - 45),
        (6, 40 + 6 - 37),
        (5, 25 + 6 - 23),
    ]
    assert len(PAPER_TILING.kept_origins((45, 37, 23))) == 3 * 2 * 5
    assert PAPER_TILING.efficiency == pytest.approx(20 * 20 * 5 / (32 * 32 * 16))


def test_wide_layout_numbers_by_hand():
    # The paper's patch with its centre 24 x 24 x 8 kept: 4 voxels of context each side.
    assert WIDE_TILING.patch == PAPER_TILING.patch
    assert WIDE_TILING.grid((45, 37, 23)) == (2, 2, 3)  # ceil(45/24), ceil(37/24), ceil(23/8)
    assert WIDE_TILING.padding((45, 37, 23)) == [(4, 7), (4, 15), (4, 5)]
    assert WIDE_TILING.efficiency == pytest.approx(24 * 24 * 8 / (32 * 32 * 16))
    # A brain-sized box runs 2.3-2.4x fewer tiles than the paper's layout.
    shape = (160, 192, 144)
    ratio = len(PAPER_TILING.kept_origins(shape)) / len(WIDE_TILING.kept_origins(shape))
    assert 2.2 < ratio < 2.5
    assert TILINGS[DEFAULT_TILING] is WIDE_TILING


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES)
def test_kept_blocks_cover_every_voxel_exactly_once(layout, shape):
    count = _coverage(layout, shape)
    np.testing.assert_array_equal(count, 1)
    for origin in layout.kept_origins(shape):
        assert all(0 <= o < s for o, s in zip(origin, shape, strict=True))  # no empty block


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES)
def test_with_mask_brain_voxels_covered_once_and_empty_tiles_skipped(layout, shape):
    mask = _blob_mask(shape)
    kept = layout.kept_origins(shape, mask)
    every = layout.kept_origins(shape)
    count = _coverage(layout, shape, mask)
    np.testing.assert_array_equal(count[mask], 1)
    assert count.max() <= 1
    # A tile is run if and only if its kept block holds a brain voxel.
    for origin in every:
        block = tuple(slice(o, o + k) for o, k in zip(origin, layout.kept, strict=True))
        assert (origin in kept) == bool(mask[block].any())
    assert kept == [o for o in every if o in kept]  # same order as the full list


def test_empty_mask_runs_no_tile():
    assert PAPER_TILING.kept_origins((45, 37, 23), np.zeros((45, 37, 23), bool)) == []


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES)
def test_patches_fit_exactly_in_padded_volume(layout, shape):
    pads = layout.padding(shape)
    padded = [s + a + b for s, (a, b) in zip(shape, pads, strict=True)]
    assert all(a >= 0 and b >= 0 for a, b in pads)
    # The kept block at unpadded origin o sits at o + offset in the padded volume, so the
    # patch starts at o: the padding before must equal the offset.
    assert [a for a, _ in pads] == list(layout.offset)
    origins = np.array(layout.kept_origins(shape))
    for axis in range(3):
        starts = origins[:, axis]
        assert starts.min() == 0
        assert starts.max() + layout.patch[axis] == padded[axis]  # last patch ends at the end


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patch": (30, 32, 16)},
        {"patch": (32, 32, 0), "kept": (20, 20, 0), "offset": (6, 6, 0)},
        {"patch": (32, 32)},
        {"kept": (20, 20, 0)},
        {"kept": (20, 20, 5.5)},
        {"offset": (-1, 6, 5)},
        {"offset": (13, 6, 5)},  # 13 + 20 > 32
        {"kept": (33, 20, 5), "offset": (0, 6, 5)},
    ],
)
def test_invalid_layout_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        TileLayout(**kwargs)


def test_to_network_and_back():
    x = torch.arange(2 * 3 * 8 * 16 * 24).reshape(2, 3, 8, 16, 24)  # (B, C, X, Y, Z)
    net = to_network(x)
    assert net.shape == (2, 3, 24, 8, 16)  # (B, C, D=Z, H=X, W=Y)
    assert net[1, 2, 5, 3, 7] == x[1, 2, 3, 7, 5]
    assert torch.equal(from_network(net), x)


# --------------------------------------------------------------------------------------
# Devices and arguments


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    with pytest.raises(ValueError, match="device"):
        resolve_device("banana")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_resolve_device_cuda_without_gpu_raises():
    with pytest.raises(ValueError, match="cuda"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="cuda"):
        resolve_device("cuda:0")


def test_predictor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="models"):
        Predictor([], device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        Predictor([VoxelwiseNet()], device="cpu", batch_size=0)
    predictor = Predictor([VoxelwiseNet()], device="cpu")
    with pytest.raises(ValueError, match="images"):
        predictor.predict(np.zeros((5, 6, 7), np.float32))


# --------------------------------------------------------------------------------------
# Placement of the predictions


def _scores(x: torch.Tensor, scale: float) -> TaskOutputs:
    """Voxel-wise scores of the three tasks from x (N, 4, ...): no spatial mixing."""
    return TaskOutputs(
        scale * x[:, [0, 1, 2, 3, 0]],
        scale * (x[:, [1, 2, 3, 0, 2]] ** 2 - x[:, [3, 3, 0, 1, 1]]),
        scale * x[:, [2, 3]] * x[:, [0, 1]],
    )


class VoxelwiseNet(nn.Module):
    """A fake network: TaskOutputs computed voxel by voxel from the input.

    Raises when the input is not (B, 4, D, H, W) with D the patch's slice count, so a
    predictor feeding Z anywhere but in the depth axis fails.
    """

    def __init__(self, scale: float = 10.0, depth: int | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.depth = depth
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> TaskOutputs:
        if x.ndim != 5 or x.shape[1] != 4:
            raise ValueError(f"expected (B, 4, D, H, W), got {tuple(x.shape)}")
        if self.depth is not None and x.shape[2] != self.depth:
            raise ValueError(f"expected depth {self.depth}, got {tuple(x.shape)}")
        self.calls.append(tuple(x.shape))
        return _scores(x, self.scale)


def _expected(images: np.ndarray, scale: float) -> TaskProbabilities:
    """What a :class:`VoxelwiseNet` predicts for every voxel of the whole volume."""
    x = torch.from_numpy(images)[None]  # (1, 4, X, Y, Z)
    return TaskProbabilities(*(F_.softmax(s, dim=1)[0].numpy() for s in _scores(x, scale)))


def _images(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, *shape)).astype(np.float32)


def _assert_background(probs: TaskProbabilities, where: np.ndarray) -> None:
    for task in probs:
        np.testing.assert_array_equal(task[0][where], 1.0)
        np.testing.assert_array_equal(task[1:][:, where], 0.0)


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        (PAPER_TILING, (45, 37, 23)),
        (PAPER_TILING, (7, 50, 11)),
        (WIDE_TILING, (45, 37, 23)),
        (FAST_TILING, (45, 37, 23)),
        (FAST_TILING, (70, 50, 23)),
    ],
    ids=["paper-45x37x23", "paper-7x50x11", "wide-45x37x23", "fast-45x37x23", "fast-70x50x23"],
)
@pytest.mark.parametrize("batch_size", [1, 7])
def test_predictions_land_on_their_voxels(layout, shape, batch_size):
    images = _images(shape)
    mask = _blob_mask(shape, scatter=0)
    net = VoxelwiseNet(depth=layout.patch[2])
    calls: list[tuple[int, int]] = []
    predictor = Predictor([net], device="cpu", batch_size=batch_size, layout=layout)
    probs = predictor.predict(images, mask, progress=lambda d, t: calls.append((d, t)))

    expected = _expected(images, net.scale)
    for got, want, channels in zip(probs, expected, (5, 5, 2), strict=True):
        assert got.shape == (channels, *shape)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got[:, mask], want[:, mask], rtol=1e-6, atol=1e-7)
    # Voxels of tiles that were run match the network even outside the mask; voxels of
    # skipped tiles are background.
    run = _coverage(layout, shape, mask).astype(bool)
    for got, want in zip(probs, expected, strict=True):
        np.testing.assert_allclose(got[:, run], want[:, run], rtol=1e-6, atol=1e-7)
    assert (~run).any()
    _assert_background(probs, ~run)

    n_tiles = len(layout.kept_origins(shape, mask))
    assert sum(c[0] for c in net.calls) == n_tiles  # each kept block predicted once
    assert all(c[1:] == (4, layout.patch[2], *layout.patch[:2]) for c in net.calls)
    assert max(c[0] for c in net.calls) == min(batch_size, n_tiles)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (n_tiles, n_tiles)


def test_without_mask_every_voxel_is_predicted():
    shape = (20, 20, 5)
    images = _images(shape, seed=1)
    probs = Predictor([VoxelwiseNet()], device="cpu", batch_size=3).predict(images)
    for got, want in zip(probs, _expected(images, 10.0), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_mask_outside_every_tile_gives_background_everywhere():
    shape = (7, 9, 6)
    net = VoxelwiseNet()
    probs = Predictor([net], device="cpu").predict(_images(shape), np.zeros(shape, bool))
    assert net.calls == []
    _assert_background(probs, np.ones(shape, bool))


def test_ensemble_is_mean_of_probabilities():
    shape = (25, 21, 12)
    images = _images(shape, seed=2)
    mask = _blob_mask(shape)
    nets = [VoxelwiseNet(scale=10.0), VoxelwiseNet(scale=0.7)]
    probs = Predictor(nets, device="cpu", batch_size=4).predict(images, mask)
    first, second = _expected(images, 10.0), _expected(images, 0.7)
    for got, a, b in zip(probs, first, second, strict=True):
        np.testing.assert_allclose(
            got[:, mask], (a[:, mask] + b[:, mask]) / 2, rtol=1e-6, atol=1e-7
        )
        # The two members disagree, so the test can tell a mean from either member.
        assert np.abs(a - b)[:, mask].max() > 0.1


def test_real_network_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = build_model(ArchConfig(width=4))
    shape = (25, 18, 5)  # 2 x 1 x 1 tiles
    images = _images(shape, seed=3)
    first = Predictor([model], device="cpu", batch_size=4).predict(images)
    second = Predictor([model], device="cpu", batch_size=4).predict(images)
    single = Predictor([model], device="cpu", batch_size=1).predict(images)
    for a, b, c in zip(first, second, single, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-5)
        np.testing.assert_allclose(a.sum(axis=0), 1.0, atol=1e-5)
        assert not np.all(a[0] == 1.0)  # the network's output, not the background fill
    assert not model.training  # the predictor runs the network in eval mode


def test_channels_last_is_the_cpu_default_and_changes_nothing_but_rounding():
    torch.manual_seed(1)
    model = build_model(ArchConfig(width=4))
    images = _images((25, 18, 5), seed=4)
    fast = Predictor([model], device="cpu", batch_size=2)
    assert fast.channels_last
    weight = next(p for p in model.parameters() if p.ndim == 5)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    channels_last = fast.predict(images)
    plain = Predictor([model], device="cpu", batch_size=2, channels_last=False).predict(images)
    for a, b in zip(channels_last, plain, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert not np.all(a[0] == 1.0)


# --------------------------------------------------------------------------- test-time augmentation


@pytest.mark.parametrize("layout", [PAPER_TILING, SKEWED_TILING], ids=["paper", "skewed"])
def test_tta_undoes_every_flip_of_a_voxelwise_network(layout):
    # A voxel-wise network gives the same output whichever way its input is mirrored,
    # once the output is mirrored back: so TTA must equal the plain prediction, voxel by
    # voxel, on an input with no symmetry. A flip not undone would misplace voxels.
    shape = (25, 21, 12)
    images = _images(shape, seed=4)
    net = VoxelwiseNet(depth=layout.patch[2])
    plain = Predictor([net], device="cpu", layout=layout).predict(images)
    calls_plain = len(net.calls)
    tta = Predictor([net], device="cpu", layout=layout, tta=True).predict(images)
    assert len(net.calls) - calls_plain == 8 * calls_plain  # eight mirrorings per batch
    for got, want in zip(tta, plain, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class PositionNet(nn.Module):
    """A fake network that sees where it is: scores grow along one patch axis."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> TaskOutputs:
        ramp = torch.arange(x.shape[self.axis], dtype=torch.float32)
        view = [1] * x.ndim
        view[self.axis] = -1
        ramp = ramp.view(view).expand(x.shape[0], 1, *x.shape[2:])
        zeros = torch.zeros_like(ramp)
        return TaskOutputs(
            torch.cat([zeros, ramp, zeros, zeros, zeros], 1),
            torch.cat([zeros, ramp, zeros, zeros, zeros], 1),
            torch.cat([zeros, ramp], 1),
        )


@pytest.mark.parametrize("axis", [2, 3, 4])
def test_tta_averages_the_mirrored_views_of_a_patch(axis):
    # A network that is not voxel-wise changes under mirroring: for a score ramp along
    # one axis, the mirrored view sees the ramp reversed, and TTA averages the two.
    patch = _images((32, 32, 16), seed=5)[None]  # one (1, 4, X, Y, Z) patch
    plain = Predictor([PositionNet(axis)], device="cpu")._forward(patch)
    tta = Predictor([PositionNet(axis)], device="cpu", tta=True)._forward(patch)
    spatial = {2: 4, 3: 2, 4: 3}[axis]  # network (B, C, Z, X, Y) axis -> patch axis
    p = plain[2][0, 1].numpy()  # P(ET), (X, Y, Z)
    expected = (p + np.flip(p, spatial - 2)) / 2
    np.testing.assert_allclose(tta[2][0, 1].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - p).max() > 0.1  # the two views really differ


def test_tta_makes_a_real_network_mirror_equivariant():
    # Convolution kernels are not symmetric, so a network alone does not commute with
    # mirroring; averaged over all eight mirrorings it does: a mirrored input gives the
    # mirrored output, and a mirror-symmetric input gives a mirror-symmetric output.
    torch.manual_seed(0)
    net = build_model(ArchConfig(width=4)).eval()
    patch = _images((32, 32, 16), seed=6)[None]
    half = _images((16, 16, 8), seed=7)
    for axis in (1, 2, 3):
        half = np.concatenate([half, np.flip(half, axis)], axis=axis)
    symmetric = np.ascontiguousarray(half[None])
    tta = Predictor([net], device="cpu", tta=True)
    plain = Predictor([net], device="cpu")
    for axis in (2, 3, 4):  # X, Y, Z of the (B, C, X, Y, Z) patch
        mirrored = np.ascontiguousarray(np.flip(patch, axis))
        for a, b in zip(tta._forward(mirrored), tta._forward(patch), strict=True):
            np.testing.assert_allclose(a.numpy(), np.flip(b.numpy(), axis), atol=1e-5)
        for out in tta._forward(symmetric):
            np.testing.assert_allclose(out.numpy(), np.flip(out.numpy(), axis), atol=1e-5)
    no_tta = plain._forward(symmetric)[0].numpy()
    assert np.abs(no_tta - np.flip(no_tta, 2)).max() > 1e-3  # the network alone is not


def test_mirror_tta_averages_the_left_right_mirror_only():
    # Two passes (as is, and mirrored along X): a real network becomes equivariant to
    # the left-right mirror, not to the others, at a quarter of the eight passes' cost.
    torch.manual_seed(0)
    net = build_model(ArchConfig(width=4)).eval()
    patch = _images((32, 32, 16), seed=6)[None]
    mirror = Predictor([net], device="cpu", tta="mirror")
    assert mirror.flips == TTA_PASSES["mirror"] == ((), (2,)) and mirror.tta == "mirror"
    left_right = np.ascontiguousarray(np.flip(patch, 2))
    for a, b in zip(mirror._forward(left_right), mirror._forward(patch), strict=True):
        np.testing.assert_allclose(a.numpy(), np.flip(b.numpy(), 2), atol=1e-5)
    front_back = np.ascontiguousarray(np.flip(patch, 3))
    a, b = mirror._forward(front_back)[0].numpy(), mirror._forward(patch)[0].numpy()
    assert np.abs(a - np.flip(b, 3)).max() > 1e-3
    # It is the mean of the plain pass and the mirrored pass mirrored back.
    plain = Predictor([net], device="cpu")
    for got, one, other in zip(
        mirror._forward(patch), plain._forward(patch), plain._forward(left_right), strict=True
    ):
        np.testing.assert_allclose(got.numpy(), (one + other.flip(2)).numpy() / 2, atol=1e-6)


def test_tta_takes_a_bool_or_a_mode():
    net = VoxelwiseNet(depth=16)
    assert Predictor([net], device="cpu", tta=True).flips == TTA_FLIPS
    assert Predictor([net], device="cpu", tta="all").tta == "all"
    assert Predictor([net], device="cpu", tta=False).flips == ((),)
    assert Predictor([net], device="cpu").tta == "off"
    with pytest.raises(ValueError, match=re.escape("tta must be one of 'off', 'mirror', 'all'")):
        Predictor([net], device="cpu", tta="sideways")


def test_every_tiling_name_has_a_layout():
    assert sorted(TILINGS) == sorted(TILING_NAMES)
    assert DEFAULT_TILING in TILINGS


def test_constructing_and_running_a_predictor_leaves_cudnn_settings_alone():
    """Inference asks cuDNN for deterministic algorithms for its own passes only; a
    training run in the same process keeps whatever it set."""
    import torch.backends.cudnn as cudnn

    before = (cudnn.benchmark, cudnn.deterministic)
    cudnn.benchmark, cudnn.deterministic = True, False
    try:
        predictor = Predictor([build_model(ArchConfig(width=4))], device="cpu")
        predictor.predict(np.zeros((4, 24, 24, 16), dtype=np.float32))
        assert (cudnn.benchmark, cudnn.deterministic) == (True, False)
    finally:
        cudnn.benchmark, cudnn.deterministic = before
