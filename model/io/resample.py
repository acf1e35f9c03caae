"""Resampling a volume from one voxel grid onto another, in physical (world) space.

A grid is a shape and a 4x4 voxel-to-world affine. :func:`resample_to_grid` finds, for
every voxel centre of the target grid, the matching point of the source grid and
interpolates there; nothing is registered, so the two grids must already share one
world coordinate system (a DICOM FrameOfReferenceUID, or co-registered NIfTI files).

When the target grid's voxel centres fall exactly on source voxel centres along
permuted or flipped axes (the same grid, or the same voxels stored in another order,
e.g. an axial stack written as sagittal slices), voxels are copied, not interpolated,
so the values are exact.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Largest deviation (in voxels) from an integer voxel index or from a signed
#: permutation matrix for two grids to count as sharing their voxel centres.
GRID_TOLERANCE = 1e-4


def _check_grid(shape: tuple[int, ...], affine: np.ndarray, name: str) -> np.ndarray:
    aff = np.asarray(affine, dtype=np.float64)
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f"{name} shape must be three positive ints, got {shape!r}")
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"{name} affine must be a finite 4x4 matrix, got shape {aff.shape}")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"{name} affine must be invertible, got {aff[:3, :3].tolist()}")
    return aff


def voxel_mapping(source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """The 4x4 matrix taking target voxel indices to source voxel indices."""
    return np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ np.asarray(
        target_affine, dtype=np.float64
    )


def _exact_indices(
    mapping: np.ndarray, source_shape: tuple[int, ...], target_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """``(axes, signs, offsets)`` when target voxel centres are source voxel centres
    along a signed permutation of the axes and all fall inside the source; else None."""
    linear, offset = mapping[:3, :3], mapping[:3, 3]
    rounded = np.round(linear)
    if np.max(np.abs(linear - rounded)) > GRID_TOLERANCE:
        return None
    if not np.array_equal(np.abs(rounded).sum(axis=0), np.ones(3)) or not np.array_equal(
        np.abs(rounded).sum(axis=1), np.ones(3)
    ):
        return None
    if np.max(np.abs(offset - np.round(offset))) > GRID_TOLERANCE:
        return None
    # Target axis t reads source axis axes[t] with step signs[t] from offsets[...].
    axes = tuple(int(np.flatnonzero(rounded[:, t])[0]) for t in range(3))
    signs = tuple(int(rounded[axes[t], t]) for t in range(3))
    start = np.round(offset).astype(int)
    for t in range(3):
        first = start[axes[t]]
        last = first + signs[t] * (target_shape[t] - 1)
        if min(first, last) < 0 or max(first, last) > source_shape[axes[t]] - 1:
            return None
    return axes, signs, tuple(int(s) for s in start)


def resample_to_grid(
    volume: np.ndarray,
    affine: np.ndarray,
    target_shape: tuple[int, int, int],
    target_affine: np.ndarray,
    *,
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Resamples ``volume`` (on the grid ``affine``) onto ``(target_shape, target_affine)``.

    Args:
        volume: 3D array ``(X, Y, Z)``.
        affine: its 4x4 voxel-to-world matrix.
        target_shape: the target grid's shape.
        target_affine: the target grid's voxel-to-world matrix (same world space).
        order: spline order: 0 nearest neighbour (label maps), 1 trilinear (images).
        fill: value of target voxels outside the source volume.

    Returns:
        float32 array of ``target_shape`` (the input's dtype when voxels are copied
        exactly, see the module docstring).

    Raises:
        ValueError: a shape or affine is malformed, or ``order`` is not 0 to 3.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {vol.shape}")
    if order not in (0, 1, 2, 3):
        raise ValueError(f"order must be 0, 1, 2 or 3, got {order!r}")
    src = _check_grid(vol.shape, affine, "source")
    shape = tuple(int(n) for n in target_shape)
    tgt = _check_grid(shape, target_affine, "target")
    mapping = voxel_mapping(src, tgt)

    exact = _exact_indices(mapping, vol.shape, shape)
    if exact is not None:
        axes, signs, start = exact
        index: list[slice] = [slice(None)] * 3
        for t in range(3):
            a = axes[t]
            first = start[a]
            stop = first + signs[t] * shape[t]
            index[a] = slice(first, stop if stop >= 0 else None, signs[t])
        picked = vol[tuple(index)]  # source axis order
        return np.ascontiguousarray(np.transpose(picked, axes))  # target axis order

    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)  # (3, N) target indices
    coords = mapping[:3, :3] @ grid + mapping[:3, 3:4]  # (3, N) source indices
    out = ndimage.map_coordinates(
        vol.astype(np.float32, copy=False),
        coords,
        order=order,
        mode="constant",
        cval=fill,
        prefilter=order > 1,
    )
    return out.reshape(shape).astype(np.float32, copy=False)
