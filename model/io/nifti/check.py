"""Checking a case's NIfTI files without holding their voxels: the service's submission
checks.

:func:`check_case` runs the rules of :func:`model.io.nifti.read.load_case` - the same header
checks (:func:`~model.io.nifti.read.inspect_case`), then the same value rules - but reads each
volume in slabs of at most :data:`SLAB_VOXELS` voxels, front to back, so that the API
process never holds a whole volume: a file the command line accepts is accepted here,
and the reverse, with the same codes and messages. :func:`check_labels` does the same
for a reference label map.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from model.io.nifti.image import raise_value_problem
from model.io.nifti.read import CaseLayout, inspect_case, inspect_labels
from model.io.volumes import AFFINE_ATOL, MODALITIES, InputError, PathLike
from model.labels import LabelError, to_brats2018

#: Voxels read at a time (64 MB as float32).
SLAB_VOXELS = 1 << 24


def _slabs(
    path: Path, shape: tuple[int, int, int], channel: int | None, what: str
) -> Iterator[np.ndarray]:
    """The volume (or one channel of a 4D file) as float32 slabs along its last spatial
    axis, read front to back from one open file (a compressed file decodes once)."""
    img = cast(nib.Nifti1Image, nib.load(path, keep_file_open=True))
    step = max(1, SLAB_VOXELS // max(1, shape[0] * shape[1]))
    proxy = img.dataobj
    extra = len(img.shape) - 3  # trailing axes: singletons, or the 4D file's channels
    try:
        for z in range(0, shape[2], step):
            index: tuple[slice | int, ...] = (slice(None), slice(None), slice(z, z + step))
            if channel is not None:
                index += (0,) * (extra - 1) + (channel,)
            else:
                index += (0,) * extra
            try:
                yield np.asarray(proxy[index], dtype=np.float32)
            except Exception as err:  # EOFError, OSError, zlib.error, short buffers, ...
                raise InputError(
                    "unreadable",
                    f"{what} cannot be read ({err}); the file looks truncated or corrupt, "
                    "e.g. by an interrupted upload or copy. Send it again",
                    path,
                ) from err
    finally:
        del proxy, img  # closes the file nibabel kept open


def _check_volume(
    path: Path, modality: str, shape: tuple[int, int, int], channel: int | None
) -> None:
    n_bad, any_nonzero = 0, False
    what = f"{modality} file {path}"
    for slab in _slabs(path, shape, channel, what):
        finite = np.isfinite(slab)
        n_bad += int(slab.size - np.count_nonzero(finite))
        any_nonzero = any_nonzero or bool(np.any(slab))
    raise_value_problem(path, modality, channel, n_bad, any_nonzero)


def check_case(
    source: Mapping[str, PathLike] | PathLike,
    *,
    name: str | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> CaseLayout:
    """Every rule of :func:`~model.io.nifti.read.load_case`, the voxels read in slabs.

    Raises:
        InputError: exactly where ``load_case`` would, with the same code.
    """
    layout = inspect_case(source, name=name, affine_atol=affine_atol)
    for c, modality in enumerate(MODALITIES):
        channel = c if layout.four_d else None
        _check_volume(layout.files[modality], modality, layout.shape, channel)
    return layout


def check_labels(path: PathLike, like: CaseLayout, affine_atol: float = AFFINE_ATOL) -> None:
    """The rules of :func:`~model.io.nifti.read.load_labels` for a reference of ``like``, the
    voxels read in slabs.

    Raises:
        InputError: ``not_found``, ``not_nifti``, ``unreadable``, ``not_3d``,
            ``shape_mismatch``, ``affine_mismatch`` or ``bad_labels``.
    """
    file = Path(path)
    what = f"label file {file}"
    inspect_labels(file, like, affine_atol)
    values: set[float] = set()
    x, y, z = like.shape
    for slab in _slabs(file, (x, y, z), None, what):
        if not np.all(np.isfinite(slab)) or not np.all(slab == np.round(slab)):
            values.add(0.5)  # a non-integer value: to_brats2018 says so below
        values.update(np.unique(slab).tolist())
    try:
        to_brats2018(np.array(sorted(values), dtype=np.float64))
    except LabelError as err:
        raise InputError(
            "bad_labels",
            f"{what}: {err}. Send a BraTS label map (0 background, 1 NCR/NET, 2 edema, "
            "4 or 3 enhancing tumour)",
            file,
        ) from err
