"""Intensity normalisation variants: the functions, and that a model's normalisation
travels from training (the cache, the run's config) through its checkpoint to inference.
"""

from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest
import torch

from model.defaults import NORMALISATIONS
from model.inference import pipeline as pipeline_module
from model.inference.pipeline import load_predictor, segment_images
from model.inference.preprocess import (
    CLIP_PERCENTILES,
    LANDMARK_PERCENTILES,
    STANDARD_LANDMARKS,
    brain_mask,
    clipped_zscore,
    landmark_standardise,
    normalise,
    preprocess,
    zscore,
)
from model.inference.tiling import Predictor
from model.io.phantom import write_phantom
from model.net.checkpoint import load_checkpoint, save_checkpoint
from model.net.network import ArchConfig, build_model
from model.training import data as data_module
from model.training.data import build_cache


def _brain(seed: int = 0, shape: tuple[int, int, int] = (20, 20, 12)) -> np.ndarray:
    """(2, X, Y, Z): a box of brain with skewed (gamma-distributed) intensities."""
    rng = np.random.default_rng(seed)
    images = np.zeros((2, *shape))
    images[:, 2:-2, 2:-2, 1:-1] = rng.gamma(
        2.0, 100.0, (2, shape[0] - 4, shape[1] - 4, shape[2] - 2)
    )
    return images + (images > 0) * 1.0  # strictly positive inside the brain


@pytest.mark.parametrize("method", NORMALISATIONS)
def test_every_normalisation_is_pure_float32_and_zero_outside_the_brain(method) -> None:
    images = _brain()
    before = images.copy()
    mask = brain_mask(images)
    out = normalise(images, mask, method)
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_array_equal(images, before)
    assert not np.any(out[:, ~mask])
    assert np.all(np.isfinite(out))


def test_zscore_is_the_paper_default() -> None:
    images = _brain()
    mask = brain_mask(images)
    np.testing.assert_array_equal(normalise(images, mask), zscore(images, mask))
    np.testing.assert_array_equal(preprocess(images).images, preprocess(images, 0, "zscore").images)


def test_unknown_normalisation_is_refused() -> None:
    images = _brain()
    with pytest.raises(ValueError, match="normalisation must be one of zscore, clipped"):
        normalise(images, brain_mask(images), "minmax")
    with pytest.raises(ValueError, match="normalisation"):
        preprocess(images, normalisation="minmax")


def test_clipped_zscore_is_not_moved_by_a_few_extreme_voxels() -> None:
    images = _brain(1)
    mask = brain_mask(images)
    spiked = images.copy()
    spiked[0, 5, 5, 5] = spiked[0, 6, 6, 6] = 1e6  # two vessel-bright voxels
    # Plain z-score: two voxels move every other voxel's value by a lot.
    plain = zscore(spiked, mask)[0][mask] - zscore(images, mask)[0][mask]
    assert np.abs(plain).max() > 0.5
    # Clipped: the spikes are clipped to the 99.5th percentile and the rest barely move.
    clipped = clipped_zscore(spiked, mask)
    moved = clipped[0][mask] - clipped_zscore(images, mask)[0][mask]
    assert np.median(np.abs(moved)) < 0.01
    high = np.percentile(spiked[0][mask], CLIP_PERCENTILES[1])
    assert clipped[0, 5, 5, 5] == pytest.approx(clipped[0][mask][spiked[0][mask] >= high].min())
    inside = clipped[0][mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-5 and inside.std() == pytest.approx(1.0, abs=1e-5)


def test_landmarks_go_to_the_standard_normal_quantiles() -> None:
    images = _brain(2)
    mask = brain_mask(images)
    out = landmark_standardise(images, mask)
    for c in range(2):
        got = np.percentile(out[c][mask], LANDMARK_PERCENTILES)
        # Exact at the landmarks; np.percentile interpolates between the two voxels
        # around each, and around the end landmarks one of them lies beyond, on the
        # other slope.
        np.testing.assert_allclose(got[1:-1], STANDARD_LANDMARKS[1:-1], atol=2e-3)
        np.testing.assert_allclose(got[[0, -1]], np.take(STANDARD_LANDMARKS, [0, -1]), atol=2e-2)
    assert STANDARD_LANDMARKS[5] == 0.0  # the median goes to 0
    assert STANDARD_LANDMARKS[-1] == pytest.approx(NormalDist().inv_cdf(0.99))


def test_landmarks_undo_a_change_of_contrast_that_zscore_keeps() -> None:
    """Another scanner's contrast (here a gamma curve, scale and offset) changes the
    z-scored values of the same tissue; landmark standardisation puts the landmarks back
    where they were, and everything between them close to where it was."""
    images = _brain(3)
    mask = brain_mask(images)
    other = images.copy()
    other[:, mask] = 40.0 + 3.0 * (images[:, mask] / 100.0) ** 0.6 * 100.0
    z_shift = np.abs(zscore(other, mask)[:, mask] - zscore(images, mask)[:, mask])
    l_shift = np.abs(
        landmark_standardise(other, mask)[:, mask] - landmark_standardise(images, mask)[:, mask]
    )
    inner = (images[:, mask] > 0) & (
        np.abs(landmark_standardise(images, mask)[:, mask]) < STANDARD_LANDMARKS[-1]
    )
    assert np.median(l_shift[inner]) < np.median(z_shift[inner]) / 3
    # An affine change of intensities changes nothing at all.
    affine = images.copy()
    affine[:, mask] = 7.0 * images[:, mask] + 300.0
    np.testing.assert_allclose(
        landmark_standardise(affine, mask), landmark_standardise(images, mask), atol=1e-4
    )


def test_landmarks_extend_beyond_the_end_landmarks_with_the_whole_range_slope() -> None:
    """A narrow 90th-99th percentile range makes a steep last segment; the few voxels
    above the 99th percentile follow the 1st-99th slope instead, staying near the rest."""
    images = np.zeros((1, 10, 10, 10))
    values = np.concatenate([np.linspace(0.0, 100.0, 900), np.full(90, 100.5), [150.0] * 10])
    images[0, :, :, :] = (values + 1.0).reshape(10, 10, 10)
    mask = brain_mask(images)
    out = landmark_standardise(images, mask)[0][mask]
    source = np.percentile(images[0][mask], LANDMARK_PERCENTILES)
    slope = (STANDARD_LANDMARKS[-1] - STANDARD_LANDMARKS[0]) / (source[-1] - source[0])
    top = STANDARD_LANDMARKS[-1] + (151.0 - source[-1]) * slope
    assert out.max() == pytest.approx(top, rel=1e-4)
    steep = (STANDARD_LANDMARKS[-1] - STANDARD_LANDMARKS[-2]) / (source[-1] - source[-2])
    assert steep > 3 * slope  # the last segment is the steep one here
    assert out.max() < STANDARD_LANDMARKS[-1] + (151.0 - source[-1]) * steep / 3


def test_landmarks_of_a_flat_or_few_level_modality_stay_finite() -> None:
    images = np.zeros((2, 6, 6, 6))
    images[0, 1:5, 1:5, 1:5] = 5.0  # flat: no spread
    images[1, 1:5, 1:5, 1:5] = np.where(np.arange(64).reshape(4, 4, 4) % 2, 2.0, 3.0)  # 2 levels
    mask = brain_mask(images)
    out = landmark_standardise(images, mask)
    assert not np.any(out[0])
    assert np.all(np.isfinite(out[1])) and out[1][mask].min() < out[1][mask].max()


def test_architecture_names_its_normalisation_and_older_configs_read_as_zscore() -> None:
    assert ArchConfig().normalisation == "zscore"
    config = ArchConfig(width=4, normalisation="landmarks")
    assert ArchConfig.from_dict(config.to_dict()) == config
    legacy = {k: v for k, v in config.to_dict().items() if k != "normalisation"}
    assert ArchConfig.from_dict(legacy).normalisation == "zscore"
    with pytest.raises(ValueError, match="normalisation must be one of"):
        ArchConfig(normalisation="histogram")


def _checkpoint(tmp_path, name: str, normalisation: str):
    torch.manual_seed(0)
    config = ArchConfig(width=2, normalisation=normalisation)
    return save_checkpoint(tmp_path / name, build_model(config), config)


def test_inference_normalises_as_the_checkpoint_says(tmp_path, monkeypatch) -> None:
    path = _checkpoint(tmp_path, "l.pt", "landmarks")
    assert load_checkpoint(path).config.normalisation == "landmarks"
    predictor, _ = load_predictor([path], "cpu")
    assert predictor.normalisation == "landmarks"
    seen: list[str] = []
    real = pipeline_module.preprocess

    def spy(images, margin=0, normalisation="zscore"):
        seen.append(normalisation)
        return real(images, margin, normalisation)

    monkeypatch.setattr(pipeline_module, "preprocess", spy)
    images = _brain(4, (24, 24, 16))
    images = np.concatenate([images, images])  # four modalities
    segment_images(images.astype(np.float32), np.eye(4), predictor)
    assert seen == ["landmarks"]


def test_an_ensemble_of_differently_normalised_models_is_refused(tmp_path) -> None:
    paths = [_checkpoint(tmp_path, "z.pt", "zscore"), _checkpoint(tmp_path, "c.pt", "clipped")]
    with pytest.raises(ValueError, match="share one input normalisation"):
        load_predictor(paths, "cpu")
    with pytest.raises(ValueError, match="normalisation"):
        Predictor([build_model(ArchConfig(width=2))], "cpu", normalisation="minmax")


def test_the_training_cache_is_made_and_kept_per_normalisation(tmp_path, monkeypatch) -> None:
    write_phantom(tmp_path / "data", name="a", shape=(24, 24, 16), seed=0)
    case_dir = tmp_path / "data" / "a"
    zs = build_cache([case_dir], tmp_path / "cache")[0]
    meta = tmp_path / "cache" / "a" / "meta.json"
    assert json.loads(meta.read_text())["normalisation"] == "zscore"
    zs_images = np.array(zs.images)
    lm = build_cache([case_dir], tmp_path / "cache", normalisation="landmarks")[0]
    assert json.loads(meta.read_text())["normalisation"] == "landmarks"
    assert not np.array_equal(np.array(lm.images), zs_images)
    # A cache entry written before entries named their normalisation was z-scored: it is
    # kept for a z-score run, not cached again.
    build_cache([case_dir], tmp_path / "cache")
    info = json.loads(meta.read_text())
    del info["normalisation"]
    meta.write_text(json.dumps(info))

    def refuse(*_args):
        raise AssertionError("a cached case was cached again")

    monkeypatch.setattr(data_module, "cache_case", refuse)
    again = build_cache([case_dir], tmp_path / "cache")[0]
    np.testing.assert_array_equal(np.array(again.images), zs_images)
    with pytest.raises(AssertionError, match="cached again"):
        build_cache([case_dir], tmp_path / "cache", normalisation="clipped")
