"""Reading the four MRI modalities of a case, and a reference label map, from NIfTI.

A case comes in one of three forms:

* a mapping ``{"t1": path, "t1ce": path, "t2": path, "flair": path}`` of four 3D files
  (the BraTS 2023 names ``t1n``, ``t1c``, ``t2w`` and ``t2f`` are accepted as keys too);
* one 4D file of shape ``(X, Y, Z, 4)`` whose fourth axis holds the modalities in
  :data:`~model.io.volumes.MODALITIES` order (T1, T1ce, T2, FLAIR);
* a BraTS case folder, whose files are found by name (see
  :func:`model.io.nifti.files.find_case_files`).

Every input is validated before any computation and each problem raises
:class:`~model.io.volumes.InputError` with a stable ``code`` and a message that names the file and
modality and says how to fix it. No shape or orientation is assumed: any grid the four
files agree on is accepted, and written outputs carry the reference modality's affine
and header, so they overlay the inputs in any viewer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from model.io.nifti.files import (
    FILE_SUFFIXES,
    case_name_from_file,
    find_case_files,
    normalise_mapping,
)
from model.io.nifti.image import (
    check_same_grid,
    check_size,
    check_values,
    check_voxel_size,
    describe,
    open_image,
    read_data,
    spatial_shape,
    voxel_spacing,
)
from model.io.volumes import AFFINE_ATOL, MODALITIES, REFERENCE_MODALITY, Case, InputError
from model.labels import LabelError, to_brats2018

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class CaseLayout:
    """What the headers of a case's files say, every check that needs no voxel passed.

    Attributes:
        files: modality -> file (the same 4D file for every modality of a 4D case).
        images: modality -> opened image (voxel data not read).
        shape: the spatial grid ``(X, Y, Z)``.
        four_d: the modalities are the channels of one ``(X, Y, Z, 4)`` file.
    """

    files: dict[str, Path]
    images: dict[str, nib.Nifti1Image]
    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]
    name: str
    four_d: bool = False


def _inspect_separate(files: dict[str, Path], name: str, affine_atol: float) -> CaseLayout:
    images: dict[str, nib.Nifti1Image] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for modality, path in files.items():
        img = open_image(path, modality)
        shapes[modality] = spatial_shape(img, path, modality)
        check_size(shapes[modality], path, modality)
        check_voxel_size(img, path, modality)
        images[modality] = img
    ref = images[REFERENCE_MODALITY]
    ref_what = describe(files[REFERENCE_MODALITY], REFERENCE_MODALITY)
    for modality in MODALITIES:
        check_same_grid(
            shapes[REFERENCE_MODALITY],
            ref.affine,
            ref_what,
            shapes[modality],
            images[modality].affine,
            describe(files[modality], modality),
            files[modality],
            affine_atol,
        )
    x, y, z = shapes[REFERENCE_MODALITY][:3]
    return CaseLayout(
        files=dict(files),
        images=images,
        shape=(x, y, z),
        affine=np.array(ref.affine, dtype=np.float64),
        header=ref.header,
        spacing=voxel_spacing(ref),
        name=name,
    )


def _inspect_4d(path: Path) -> CaseLayout:
    img = open_image(path, None)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 5 and shape[3] == 1:  # NIfTI vector layout (X, Y, Z, 1, C)
        shape = shape[:3] + shape[4:]
    if len(shape) != 4 or shape[3] != len(MODALITIES):
        raise InputError(
            "not_4d",
            f"file {path} has shape {tuple(img.shape)}; a single-file case must be 4D with "
            f"shape (X, Y, Z, {len(MODALITIES)}) holding {', '.join(MODALITIES)} in that "
            "order. Otherwise send the four modalities as separate files",
            path,
        )
    check_size(shape, path, None)
    check_voxel_size(img, path, None)
    return CaseLayout(
        files={m: path for m in MODALITIES},
        images={m: img for m in MODALITIES},
        shape=(shape[0], shape[1], shape[2]),
        affine=np.array(img.affine, dtype=np.float64),
        header=img.header,
        spacing=voxel_spacing(img),
        name=case_name_from_file(path),
        four_d=True,
    )


def _read_layout(layout: CaseLayout) -> Case:
    """The voxels of an inspected case, each volume checked by value."""
    stacked = np.empty((len(MODALITIES), *layout.shape), dtype=np.float32)  # (4, X, Y, Z)
    if layout.four_d:
        path = layout.files[REFERENCE_MODALITY]
        img = layout.images[REFERENCE_MODALITY]
        data = read_data(img, path, None).reshape((*layout.shape, len(MODALITIES)))
        stacked[:] = np.moveaxis(data, -1, 0)
        for c, modality in enumerate(MODALITIES):
            check_values(stacked[c], path, modality, c)
    else:
        for c, modality in enumerate(MODALITIES):
            path = layout.files[modality]
            volume = read_data(layout.images[modality], path, modality).reshape(layout.shape)
            check_values(volume, path, modality, None)
            stacked[c] = volume
    return Case(
        images=stacked,
        affine=layout.affine.copy(),
        header=layout.header.copy(),
        spacing=layout.spacing,
        name=layout.name,
        sources=dict(layout.files),
    )


def inspect_case(
    source: Mapping[str, PathLike] | PathLike,
    *,
    name: str | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> CaseLayout:
    """Every check of :func:`load_case` that needs no voxel data: the files, their
    headers (nibabel's full parsing), shapes, grids and voxel sizes.

    Raises:
        InputError: as :func:`load_case`, except ``non_finite``, ``empty_volume`` and
            ``unreadable`` voxel data, which only reading the voxels can tell.
    """
    if affine_atol < 0 or not np.isfinite(affine_atol):
        raise ValueError(f"affine_atol must be a finite number >= 0, got {affine_atol!r}")
    if isinstance(source, Mapping):
        files = normalise_mapping(source)
        default = case_name_from_file(files[REFERENCE_MODALITY], FILE_SUFFIXES["t1"])
        return _inspect_separate(files, name or default, affine_atol)
    path = Path(source)
    if path.is_dir():
        return _inspect_separate(find_case_files(path), name or path.name, affine_atol)
    layout = _inspect_4d(path)
    return replace(layout, name=name) if name else layout


def load_case(
    source: Mapping[str, PathLike] | PathLike,
    *,
    name: str | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> Case:
    """Loads and validates the four modalities of one case.

    Args:
        source: a mapping modality -> 3D file (keys from :data:`MODALITIES` or their
            BraTS 2023 names), a single 4D file ``(X, Y, Z, 4)`` whose fourth axis is in
            :data:`MODALITIES` order, or a BraTS case folder (see :func:`find_case_files`).
        name: the case name; by default the folder name or the T1 file name without its
            modality suffix.
        affine_atol: largest elementwise difference (mm) allowed between the 4x4 affines
            of the modalities.

    Returns:
        The case, with float32 images ``(4, X, Y, Z)``.

    Raises:
        InputError: any problem with the files; ``code`` says which (see
            :data:`ERROR_CODES`).
    """
    case = _read_layout(inspect_case(source, name=name, affine_atol=affine_atol))
    logger.debug("loaded case %s: shape %s, spacing %s", case.name, case.shape, case.spacing)
    return case


def inspect_labels(
    file: Path, like: Case | CaseLayout | None, affine_atol: float = AFFINE_ATOL
) -> tuple[nib.Nifti1Image, tuple[int, ...]]:
    """The checks of a label map that need no voxels: a NIfTI file, one 3D volume, on
    ``like``'s grid when given. Returns the opened image and its 3D shape."""
    img = open_image(file, "label")
    shape = spatial_shape(img, file, "label")
    if like is not None:
        check_same_grid(
            like.shape,
            like.affine,
            f"case {like.name}",
            shape,
            img.affine,
            f"label file {file}",
            file,
            affine_atol,
        )
    return img, shape


def load_labels(
    path: PathLike,
    like: Case | None = None,
    *,
    et_label: int | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> np.ndarray:
    """Reads a label map by value and returns it in the BraTS 2018 convention.

    Integer and float maps are accepted as long as every value is a BraTS label; a map
    that writes ET as 3 (BraTS 2023) is converted to 4.

    Args:
        path: the label file.
        like: when given, the case the labels belong to: shape and affine must match.
        et_label: the value the file uses for ET (4 or 3); ``None`` infers it.
        affine_atol: tolerance (mm) on the affine difference to ``like``.

    Returns:
        uint8 array ``(X, Y, Z)`` with values in {0, 1, 2, 4}.

    Raises:
        InputError: ``not_found``, ``not_nifti``, ``unreadable``, ``not_3d``,
            ``shape_mismatch``, ``affine_mismatch`` or ``bad_labels``.
    """
    file = Path(path)
    what = f"label file {file}"
    img, shape = inspect_labels(file, like, affine_atol)
    try:
        raw = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as err:  # EOFError, OSError, zlib.error, ...
        raise InputError(
            "unreadable",
            f"{what} cannot be read ({err}); the file looks truncated or corrupt. Send it again",
            file,
        ) from err
    try:
        return to_brats2018(raw, et_label=et_label)
    except LabelError as err:
        raise InputError(
            "bad_labels",
            f"{what}: {err}. Send a BraTS label map (0 background, 1 NCR/NET, 2 edema, "
            "4 or 3 enhancing tumour)",
            file,
        ) from err
