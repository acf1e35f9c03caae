"""Tests for model/io/phantom.py: determinism, nested labels, MRI-like contrasts, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from model.inference.preprocess import brain_mask
from model.io.nifti.files import find_label_file
from model.io.nifti.read import load_case, load_labels
from model.io.phantom import make_phantom, write_phantom
from model.io.volumes import MODALITIES
from model.labels import BACKGROUND, EDEMA, ENHANCING, NCR_NET, region_mask

T1, T1CE, T2, FLAIR = (MODALITIES.index(m) for m in ("t1", "t1ce", "t2", "flair"))


@pytest.fixture(scope="module", params=[0, 1, 2])
def phantom(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_phantom(seed=request.param)


def test_shapes_dtypes_and_affine() -> None:
    images, labels, affine = make_phantom((40, 36, 24), seed=3, spacing=(1.0, 1.2, 2.5))
    assert images.shape == (4, 40, 36, 24) and images.dtype == np.float32
    assert labels.shape == (40, 36, 24) and labels.dtype == np.uint8
    np.testing.assert_allclose(np.diag(affine), (1.0, 1.2, 2.5, 1.0))
    # The grid centre maps to the world origin.
    np.testing.assert_allclose(affine @ (19.5, 17.5, 11.5, 1.0), (0, 0, 0, 1), atol=1e-9)


def test_deterministic_for_a_seed() -> None:
    a, b = make_phantom(seed=5), make_phantom(seed=5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    other = make_phantom(seed=6)
    assert not np.array_equal(a[1], other[1])  # position/size jitter moves the tumour


def test_brain_is_positive_inside_zero_outside(phantom) -> None:
    images, labels, _ = phantom
    brain = brain_mask(images)
    assert np.all(images[:, brain] > 0)
    assert np.all(images[:, ~brain] == 0)
    assert images.max() < 2000
    assert np.all(images == np.round(images))  # integer, like scanner data
    # An ellipsoid inside the grid: the border is background.
    assert not brain[0].any() and not brain[-1].any() and not brain[:, :, 0].any()
    assert 0.2 < brain.mean() < 0.5
    assert not np.any(labels[~brain])


def test_labels_are_nested(phantom) -> None:
    _, labels, _ = phantom
    assert set(np.unique(labels).tolist()) == {BACKGROUND, NCR_NET, EDEMA, ENHANCING}
    wt, tc, et = (region_mask(labels, r) for r in ("WT", "TC", "ET"))
    assert np.all(wt[tc]) and np.all(tc[et])
    # Edema is a shell around the core, the enhancing rim encloses the necrosis.
    assert np.all(np.isin(labels[ndimage.binary_dilation(labels == NCR_NET)], (NCR_NET, ENHANCING)))
    assert np.all(labels[ndimage.binary_dilation(tc)] != BACKGROUND)
    assert (labels == EDEMA).sum() > (labels == ENHANCING).sum() > (labels == NCR_NET).sum() > 0


def test_contrasts_like_real_scans(phantom) -> None:
    images, labels, _ = phantom
    normal = brain_mask(images) & (labels == BACKGROUND)

    def mean(modality: int, region: np.ndarray) -> float:
        return float(images[modality][region].mean())

    ed, et, ncr = labels == EDEMA, labels == ENHANCING, labels == NCR_NET
    # T1: tumour hypointense, necrosis darkest.
    assert mean(T1, normal) > max(mean(T1, ed), mean(T1, et)) > mean(T1, ncr)
    # T1ce: enhancing rim brightest, necrosis dark.
    assert mean(T1CE, et) > max(mean(T1CE, normal), mean(T1CE, ed))
    assert mean(T1CE, ncr) < mean(T1CE, normal)
    # T2: edema and necrosis bright.
    assert min(mean(T2, ed), mean(T2, ncr)) > mean(T2, normal)
    # FLAIR: edema bright, necrosis darker than edema.
    assert mean(FLAIR, ed) > mean(FLAIR, normal)
    assert mean(FLAIR, ncr) < mean(FLAIR, ed)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shape"):
        make_phantom((8, 64, 40))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(spacing=(1.0, 0.0, 1.0))


def test_write_phantom_loads_back(tmp_path: Path) -> None:
    paths = write_phantom(tmp_path, name="ph1", shape=(32, 32, 20), seed=4, spacing=(1, 1, 2))
    folder = tmp_path / "ph1"
    assert paths == {key: folder / f"ph1_{key}.nii.gz" for key in (*MODALITIES, "seg")}
    images, labels, affine = make_phantom((32, 32, 20), seed=4, spacing=(1, 1, 2))
    case = load_case(folder)
    assert case.name == "ph1"
    assert case.spacing == (1.0, 1.0, 2.0)
    np.testing.assert_array_equal(case.images, images)
    np.testing.assert_allclose(case.affine, affine)
    assert find_label_file(folder) == paths["seg"]
    np.testing.assert_array_equal(load_labels(paths["seg"], like=case), labels)


def test_write_phantom_rejects_path_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name"):
        write_phantom(tmp_path, name="../escape")
