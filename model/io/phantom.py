"""A synthetic brain with a BraTS-like tumour, for tests and demos without real data.

The "brain" is an ellipsoid (zero outside, as in skull-stripped BraTS scans) with smooth
intensity variation, a bias field and noise. The tumour is three nested regions sharing
one irregular shape: an edema shell (label 2) around an enhancing rim (4) around a
necrotic centre (1). Each region's intensity follows the contrasts of real scans:

========  ================  ===============  ============  ==============
region    T1                T1ce             T2            FLAIR
========  ================  ===============  ============  ==============
normal    reference         reference        reference     reference
edema     hypointense       slightly low     bright        brightest
ET rim    hypointense       brightest        bright        bright
necrosis  darkest           dark             brightest     below edema
========  ================  ===============  ============  ==============

Intensities are integers in a scanner-like range (roughly 1-1200) stored as float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from model.io.nifti.files import FILE_SUFFIXES, LABEL_SUFFIXES
from model.io.volumes import MODALITIES
from model.labels import BACKGROUND, EDEMA, ENHANCING, NCR_NET

#: Mean intensity of each tissue per modality, in :data:`MODALITIES` order
#: (T1, T1ce, T2, FLAIR); ``BACKGROUND`` is normal brain tissue here.
TISSUE_INTENSITY: dict[int, tuple[float, float, float, float]] = {
    BACKGROUND: (520.0, 480.0, 400.0, 380.0),
    EDEMA: (420.0, 440.0, 760.0, 820.0),
    ENHANCING: (430.0, 1000.0, 640.0, 640.0),
    NCR_NET: (240.0, 220.0, 900.0, 500.0),
}

MIN_SIDE = 16
"""Smallest grid side the phantom is drawn on."""


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth random field with zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    field -= field.mean()
    return field / (field.std() or 1.0)


def make_phantom(
    shape: tuple[int, int, int] = (64, 64, 40),
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws a synthetic four-modality case with its label map.

    The same arguments always give the same arrays; the seed jitters the brain's size
    and position, the tumour's position, size, shape and layer thicknesses, the texture
    and the noise.

    Args:
        shape: grid ``(X, Y, Z)``; each side at least :data:`MIN_SIDE`.
        seed: random seed.
        spacing: voxel size in mm, written into the affine.

    Returns:
        ``(images, labels, affine)``: float32 ``(4, X, Y, Z)`` in :data:`MODALITIES`
        order, zero outside the brain and positive inside; uint8 ``(X, Y, Z)`` labels in
        the BraTS 2018 convention; the 4x4 affine (RAS, centred on the grid).

    Raises:
        ValueError: bad shape or spacing.
    """
    if len(shape) != 3 or any(int(n) != n or n < MIN_SIDE for n in shape):
        raise ValueError(f"shape must be three ints >= {MIN_SIDE}, got {shape!r}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers, got {spacing!r}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    size = np.asarray(shape, dtype=np.float64)
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)  # (3, X, Y, Z)

    # Brain: an ellipsoid filling most of the grid, never touching its border.
    centre = (size - 1) / 2 + rng.uniform(-0.02, 0.02, 3) * size
    semi = 0.42 * size * rng.uniform(0.95, 1.05, 3)
    unit = (grid - centre[:, None, None, None]) / semi[:, None, None, None]
    brain = np.sum(unit**2, axis=0) <= 1.0

    # Tumour: an ellipsoid in the brain's unit coordinates, its surface made irregular by
    # a smooth field; the three regions are level sets of one distance, hence nested.
    scale = rng.uniform(0.30, 0.40) * rng.uniform(0.9, 1.1, 3)
    direction = rng.standard_normal(3)
    offset = direction / np.linalg.norm(direction) * rng.uniform(0.0, 1.0 - 1.3 * scale.max())
    distance = np.sqrt(
        np.sum(((unit - offset[:, None, None, None]) / scale[:, None, None, None]) ** 2, axis=0)
    )
    distance *= 1.0 + 0.15 * np.clip(_smooth_field(rng, shape, sigma=3.0), -1.0, 1.0)
    core_edge = rng.uniform(0.62, 0.72)
    necrosis_edge = rng.uniform(0.32, 0.42)

    labels = np.zeros(shape, dtype=np.uint8)
    labels[distance <= 1.0] = EDEMA
    labels[distance <= core_edge] = ENHANCING
    labels[distance <= necrosis_edge] = NCR_NET
    labels[~brain] = BACKGROUND

    texture = _smooth_field(rng, shape, sigma=2.0)
    gradient = rng.standard_normal(3)
    bias = 1.0 + 0.08 * np.tensordot(gradient / np.linalg.norm(gradient), unit, axes=1)

    images = np.zeros((len(MODALITIES), *shape), dtype=np.float32)  # (4, X, Y, Z)
    for c in range(len(MODALITIES)):
        base = np.full(shape, TISSUE_INTENSITY[BACKGROUND][c])
        for label in (EDEMA, ENHANCING, NCR_NET):
            base[labels == label] = TISSUE_INTENSITY[label][c]
        base = ndimage.gaussian_filter(base, sigma=0.5)  # partial-volume edges
        normal = TISSUE_INTENSITY[BACKGROUND][c]
        volume = base * (1.0 + 0.04 * texture) * bias
        volume += rng.normal(0.0, 0.025 * normal, shape)
        volume = np.clip(np.round(volume), 1.0, None)
        images[c][brain] = volume[brain]

    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -np.asarray(spacing, dtype=np.float64) * (size - 1) / 2
    return images, labels, affine


def write_phantom(
    out_dir: str | os.PathLike[str], name: str = "phantom", **kwargs: Any
) -> dict[str, Path]:
    """Writes a phantom as a BraTS 2018 case folder ``out_dir/<name>/``.

    Files: ``<name>_t1.nii.gz``, ``<name>_t1ce.nii.gz``, ``<name>_t2.nii.gz``,
    ``<name>_flair.nii.gz`` (int16) and ``<name>_seg.nii.gz`` (uint8), all with the
    phantom's affine as qform and sform (scanner coordinates, mm).

    Args:
        out_dir: parent folder; created if needed.
        name: case name, used for the folder and the file names.
        **kwargs: passed to :func:`make_phantom` (``shape``, ``seed``, ``spacing``).

    Returns:
        ``{"t1": path, "t1ce": path, "t2": path, "flair": path, "seg": path}``.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"name must be a plain file-name stem, got {name!r}")
    images, labels, affine = make_phantom(**kwargs)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    volumes = {m: images[c].astype(np.int16) for c, m in enumerate(MODALITIES)}
    volumes["seg"] = labels
    suffixes = {m: FILE_SUFFIXES[m][0] for m in MODALITIES} | {"seg": LABEL_SUFFIXES[0]}
    paths: dict[str, Path] = {}
    for key, volume in volumes.items():
        img = nib.Nifti1Image(volume, affine)
        img.header.set_qform(affine, code="scanner")
        img.header.set_sform(affine, code="scanner")
        img.header.set_xyzt_units("mm")
        path = folder / f"{name}{suffixes[key]}.nii.gz"
        nib.save(img, path)
        paths[key] = path
    return paths
