"""model/io/resample.py: grid-to-grid resampling in physical space."""

from __future__ import annotations

import numpy as np
import pytest

from model.io.resample import resample_to_grid


def _volume(shape=(5, 4, 3)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_same_grid_is_an_exact_copy():
    vol = _volume()
    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    out = resample_to_grid(vol, affine, vol.shape, affine)
    assert np.array_equal(out, vol)
    assert out is not vol


def test_flipped_and_permuted_grid_copies_voxels():
    vol = _volume()
    affine = np.eye(4)
    # Target axis 0 runs along source z, axis 1 along source x reversed, axis 2 along y.
    target = np.zeros((4, 4))
    target[:3, 0] = (0, 0, 1)
    target[:3, 1] = (-1, 0, 0)
    target[:3, 2] = (0, 1, 0)
    target[:3, 3] = (4, 0, 0)  # target (0, 0, 0) is source (4, 0, 0)
    target[3, 3] = 1
    out = resample_to_grid(vol, affine, (3, 5, 4), target)
    assert out[0, 0, 0] == vol[4, 0, 0]
    assert out[2, 1, 3] == vol[3, 3, 2]
    assert np.array_equal(out, np.transpose(vol[::-1], (2, 0, 1)))


def test_half_voxel_shift_interpolates_linearly():
    vol = np.zeros((4, 1, 1), dtype=np.float32)
    vol[:, 0, 0] = [0, 10, 20, 30]
    target = np.eye(4)
    target[0, 3] = 0.5  # centres halfway between source centres
    out = resample_to_grid(vol, np.eye(4), (3, 1, 1), target)
    assert np.allclose(out[:, 0, 0], [5, 15, 25])


def test_outside_the_source_is_filled():
    vol = np.ones((3, 3, 3), dtype=np.float32)
    target = np.eye(4)
    target[0, 3] = 10.0
    out = resample_to_grid(vol, np.eye(4), (3, 3, 3), target, fill=-1.0)
    assert np.all(out == -1.0)


def test_nearest_neighbour_keeps_labels():
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[2:4, 2:4, 2:4] = 4
    rotation = np.eye(4)
    angle = np.radians(10)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    out = resample_to_grid(labels, np.eye(4), labels.shape, rotation, order=0)
    assert set(np.unique(out)) <= {0, 4}


@pytest.mark.parametrize(
    "kwargs",
    [{"order": 5}, {"target_shape": (0, 2, 2)}, {"target_affine": np.zeros((4, 4))}],
)
def test_bad_arguments_raise(kwargs):
    args = {"target_shape": (2, 2, 2), "target_affine": np.eye(4), **kwargs}
    with pytest.raises(ValueError):
        resample_to_grid(np.zeros((2, 2, 2)), np.eye(4), **args)
