"""Tests for model/inference/preprocess.py on hand-worked and small random arrays."""

from __future__ import annotations

import numpy as np
import pytest

from model.inference.preprocess import (
    Preprocessed,
    bounding_box,
    brain_mask,
    paste,
    preprocess,
    zscore,
)


def _images(seed: int = 0) -> np.ndarray:
    """(4, 8, 9, 7) images: a brain box [2:6, 1:7, 3:6], zero elsewhere, one hole."""
    rng = np.random.default_rng(seed)
    images = np.zeros((4, 8, 9, 7), dtype=np.float32)
    images[:, 2:6, 1:7, 3:6] = rng.uniform(50, 1000, (4, 4, 6, 3))
    images[:, 3, 3, 4] = 0  # a voxel of no modality is outside the brain
    return images


def test_brain_mask_is_nonzero_in_any_modality() -> None:
    images = np.zeros((4, 2, 2, 1))
    images[0, 0, 0, 0] = 5
    images[3, 1, 1, 0] = -2
    expected = np.array([[[True], [False]], [[False], [True]]])
    np.testing.assert_array_equal(brain_mask(images), expected)


def test_brain_mask_rejects_3d() -> None:
    with pytest.raises(ValueError, match="images"):
        brain_mask(np.ones((2, 2, 2)))


def test_zscore_hand_worked() -> None:
    images = np.zeros((1, 4, 1, 1))
    images[0, :3, 0, 0] = (1.0, 2.0, 3.0)
    images[0, 3, 0, 0] = 99.0  # outside the mask: ignored, then zeroed
    mask = np.array([True, True, True, False]).reshape(4, 1, 1)
    out = zscore(images, mask)
    std = np.sqrt(2.0 / 3.0)
    np.testing.assert_allclose(out[0, :, 0, 0], (-1 / std, 0.0, 1 / std, 0.0), rtol=1e-6)


def test_zscore_statistics_and_purity() -> None:
    images = _images()
    before = images.copy()
    mask = brain_mask(images)
    out = zscore(images, mask)
    assert out.dtype == np.float32
    assert out is not images
    np.testing.assert_array_equal(images, before)
    for c in range(4):
        inside = out[c][mask].astype(np.float64)
        assert abs(inside.mean()) < 1e-5
        assert inside.std() == pytest.approx(1.0, abs=1e-5)
        assert not np.any(out[c][~mask])


def test_zscore_constant_modality_is_centred() -> None:
    images = np.zeros((2, 3, 3, 3))
    images[:, 1, 1, :] = 7.0
    images[1, 1, 1, 0] = 9.0
    mask = brain_mask(images)
    out = zscore(images, mask)
    np.testing.assert_array_equal(out[0][mask], 0.0)  # std 0: divided by 1
    assert np.all(np.isfinite(out))


def test_zscore_rejects_bad_mask() -> None:
    images = _images()
    with pytest.raises(ValueError, match="empty"):
        zscore(images, np.zeros(images.shape[1:], dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        zscore(images, np.ones((2, 2, 2), dtype=bool))


def test_bounding_box_hand_worked() -> None:
    mask = np.zeros((10, 8, 6), dtype=bool)
    mask[2, 3, 1] = mask[5, 4, 4] = True
    assert bounding_box(mask) == (slice(2, 6), slice(3, 5), slice(1, 5))
    # Margins grow the box and are clipped to the grid.
    assert bounding_box(mask, margin=2) == (slice(0, 8), slice(1, 7), slice(0, 6))
    assert bounding_box(mask, margin=(0, 1, 0)) == (slice(2, 6), slice(2, 6), slice(1, 5))


def test_bounding_box_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        bounding_box(np.zeros((3, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match="margin"):
        bounding_box(np.ones((3, 3, 3), dtype=bool), margin=-1)
    with pytest.raises(ValueError, match="3D"):
        bounding_box(np.ones((3, 3), dtype=bool))


def test_preprocess_crops_to_the_brain() -> None:
    images = _images()
    before = images.copy()
    prep = preprocess(images)
    assert isinstance(prep, Preprocessed)
    np.testing.assert_array_equal(images, before)
    assert prep.bbox == (slice(2, 6), slice(1, 7), slice(3, 6))
    assert prep.full_shape == (8, 9, 7)
    assert prep.images.shape == (4, 4, 6, 3)
    assert prep.images.dtype == np.float32
    assert prep.mask.shape == (4, 6, 3)
    assert prep.mask.sum() == 4 * 6 * 3 - 1  # the hole
    for c in range(4):
        inside = prep.images[c][prep.mask]
        assert abs(inside.mean()) < 1e-5 and inside.std() == pytest.approx(1.0, abs=1e-5)


def test_preprocess_margin_is_clipped() -> None:
    prep = preprocess(_images(), margin=3)
    assert prep.bbox == (slice(0, 8), slice(0, 9), slice(0, 7))


def test_paste_round_trip() -> None:
    images = _images()
    prep = preprocess(images)
    full_mask = brain_mask(images)
    np.testing.assert_array_equal(paste(prep.mask, prep), full_mask)
    np.testing.assert_allclose(paste(prep.images, prep), zscore(images, full_mask), atol=1e-6)


def test_paste_keeps_leading_axes_and_fill() -> None:
    prep = preprocess(_images())
    probs = np.full((3, 4, 6, 3), 0.5, dtype=np.float32)
    out = paste(probs, prep, fill=-1)
    assert out.shape == (3, 8, 9, 7) and out.dtype == np.float32
    assert np.all(out[:, 2:6, 1:7, 3:6] == 0.5)
    assert np.count_nonzero(out == -1) == 3 * (8 * 9 * 7 - 4 * 6 * 3)
    with pytest.raises(ValueError, match="crop shape"):
        paste(np.zeros((4, 6, 2)), prep)


def test_preprocess_rejects_empty_images() -> None:
    with pytest.raises(ValueError, match="zero everywhere"):
        preprocess(np.zeros((4, 3, 3, 3)))
