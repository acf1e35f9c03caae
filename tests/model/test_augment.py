"""Tests for model/training/augment.py: invariants of the patch augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from model.labels import TaskClass
from model.training.augment import AugmentConfig, augment_patch, bias_field

SHAPE = (8, 6, 4)
ALWAYS = dict(noise=1.0, blur=1.0, brightness=1.0, contrast=1.0, shift=1.0, gamma=1.0)
NEVER = dict(mirror=0.0, noise=0.0, blur=0.0, brightness=0.0, contrast=0.0, shift=0.0, gamma=0.0)


def _patch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A patch whose outer two slabs along x are outside the brain, with a tumour."""
    rng = np.random.default_rng(seed)
    target = np.full(SHAPE, TaskClass.NORMAL, dtype=np.int64)
    target[:2] = TaskClass.BACKGROUND
    target[4:6, 0:2, 0:3] = TaskClass.ENHANCING  # asymmetric along every axis
    images = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    images[:, target == TaskClass.BACKGROUND] = 0.0
    return images, target


def test_every_transform_leaves_outside_the_brain_untouched():
    images, target = _patch()
    config = AugmentConfig(mirror=0.0, **ALWAYS)
    out, out_target = augment_patch(images, target, np.random.default_rng(1), config)
    outside = target == TaskClass.BACKGROUND
    assert np.all(out[:, outside] == 0.0)
    assert not np.allclose(out[:, ~outside], images[:, ~outside])  # the inside did change
    np.testing.assert_array_equal(out_target, target)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_mirror_moves_labels_with_images(axis):
    images, target = _patch()
    # A voxel-wise code that ties each image voxel to its label: image = label everywhere.
    images = np.repeat(target[None].astype(np.float32), 4, axis=0)
    seen_flip = False
    for seed in range(100):
        out, out_target = augment_patch(
            images, target, np.random.default_rng(seed), AugmentConfig(**NEVER | {"mirror": 0.5})
        )
        np.testing.assert_array_equal(out[0], out_target.astype(np.float32))
        seen_flip |= not np.array_equal(out_target, target) and np.array_equal(
            out_target, np.flip(target, axis)
        )
    assert seen_flip, f"no seed flipped only axis {axis}"


def test_inputs_are_not_modified_and_seed_repeats():
    images, target = _patch()
    before = images.copy(), target.copy()
    config = AugmentConfig(mirror=0.5, **ALWAYS)
    a = augment_patch(images, target, np.random.default_rng(7), config)
    b = augment_patch(images, target, np.random.default_rng(7), config)
    np.testing.assert_array_equal(images, before[0])
    np.testing.assert_array_equal(target, before[1])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_gamma_keeps_the_range_and_the_order():
    images, target = _patch()
    config = AugmentConfig(**NEVER | {"gamma": 1.0, "gamma_range": (2.0, 2.0)})
    out, _ = augment_patch(images, target, np.random.default_rng(0), config)
    inside = target != TaskClass.BACKGROUND
    for c in range(4):
        before, after = images[c][inside], out[c][inside]
        assert after.min() == pytest.approx(before.min(), abs=1e-5)
        assert after.max() == pytest.approx(before.max(), abs=1e-5)
        assert np.array_equal(np.argsort(before, kind="stable"), np.argsort(after, kind="stable"))


def test_a_patch_outside_the_brain_is_only_mirrored():
    images = np.zeros((4, *SHAPE), np.float32)
    target = np.zeros(SHAPE, np.int64)
    out, _ = augment_patch(images, target, np.random.default_rng(0), AugmentConfig(**ALWAYS))
    assert not out.any()


def test_bad_probability_is_refused():
    with pytest.raises(ValueError, match="noise"):
        AugmentConfig(noise=1.5)


def test_sampler_with_augmentation_resumes_the_same_stream(tmp_path):
    from model.io.phantom import write_phantom
    from model.training.data import PatchSampler, build_cache

    write_phantom(tmp_path / "data", name="a", shape=(40, 40, 24), seed=1)
    cases = build_cache([tmp_path / "data" / "a"], tmp_path / "cache")
    sampler = PatchSampler(cases, 2, seed=3, augment=AugmentConfig())
    plain = PatchSampler(cases, 2, seed=3)
    sampler.sample((True, True, True))
    plain.sample((True, True, True))
    state = sampler.state_dict()
    after = sampler.sample((True, True, True))
    resumed = PatchSampler(cases, 2, seed=3, augment=AugmentConfig())
    resumed.load_state_dict(state)
    again = resumed.sample((True, True, True))
    for x, y in zip(after.images, again.images, strict=True):
        np.testing.assert_array_equal(x, y)
    # Patch positions do not depend on augmentation: same targets up to mirroring.
    unaugmented = plain.sample((True, True, True))
    assert after.images[0].shape == unaugmented.images[0].shape


# ------------------------------------------------------------- scanner imitation (site)

SITE_ONLY = dict(NEVER, bias=1.0, low_resolution=1.0)


def test_site_transforms_leave_outside_the_brain_and_the_labels_untouched():
    images, target = _patch()
    out, out_target = augment_patch(
        images, target, np.random.default_rng(2), AugmentConfig(**SITE_ONLY)
    )
    outside = target == TaskClass.BACKGROUND
    assert np.all(out[:, outside] == 0.0)
    assert not np.allclose(out[:, ~outside], images[:, ~outside])
    np.testing.assert_array_equal(out_target, target)
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_the_bias_field_is_smooth_positive_and_bounded():
    for seed in range(20):
        field = bias_field((32, 32, 16), np.random.default_rng(seed), strength=0.3)
        assert field.min() >= 0.7 - 1e-6 and field.max() <= 1.3 + 1e-6
        steps = [np.abs(np.diff(field, axis=a)).max() for a in range(3)]
        assert max(steps) < 0.1  # no jumps between neighbours: a smooth field
    flat = bias_field((8, 8, 8), np.random.default_rng(0), strength=0.0)
    np.testing.assert_allclose(flat, 1.0)


def test_low_resolution_keeps_a_linear_ramp_and_smooths_detail():
    # Down-sampling and linear up-sampling reproduce a linear ramp exactly...
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32), (16, 16, 16)).copy()
    images = np.stack([ramp] * 4)
    target = np.full(ramp.shape, TaskClass.NORMAL)
    config = AugmentConfig(**dict(NEVER, low_resolution=1.0))
    out, _ = augment_patch(images, target, np.random.default_rng(0), config)
    np.testing.assert_allclose(out, images, atol=1e-4)
    # ... and lose detail: a checkerboard gets flatter along the down-sampled axis.
    checker = (np.indices((16, 16, 16)).sum(0) % 2).astype(np.float32)
    out, _ = augment_patch(np.stack([checker] * 4), target, np.random.default_rng(0), config)
    assert out.std() < checker.std()


def test_site_shift_preset_is_the_default_set_widened():
    site = AugmentConfig.site_shift()
    default = AugmentConfig()
    assert default.bias == 0.0 and default.low_resolution == 0.0  # off by default
    assert site.bias > 0 and site.low_resolution > 0
    assert site.gamma_range[0] <= default.gamma_range[0]
    assert site.gamma_range[1] >= default.gamma_range[1]
    assert site.contrast_range[0] <= default.contrast_range[0]
    with pytest.raises(ValueError, match="bias_strength"):
        AugmentConfig(bias_strength=1.5)
    with pytest.raises(ValueError, match="low_resolution_factor"):
        AugmentConfig(low_resolution_factor=(0.5, 2.0))
