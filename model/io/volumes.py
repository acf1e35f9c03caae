"""A case as every reader returns it, and the error every reader raises.

:class:`Case` holds the four co-registered modalities in :data:`MODALITIES` order with
the reference modality's grid; :class:`InputError` carries a stable ``code`` (one of
:data:`ERROR_CODES`) and a message that says how to fix the input. The limits every
reader applies (voxel size, grid size, affine tolerance) are defined here once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

PathLike = str | os.PathLike[str]


#: Channel order used everywhere: in :class:`Case`, in a 4D input file and in the network.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")


#: The modality whose header and affine every output copies.
REFERENCE_MODALITY = "t1"


#: BraTS 2023 names of the modalities, accepted as mapping keys and file suffixes.
MODALITY_ALIASES: dict[str, str] = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}


#: Accepted voxel edge lengths in mm; anything outside is taken as a broken header.
MIN_VOXEL_MM = 0.1


MAX_VOXEL_MM = 10.0


#: Fewest voxels along each axis of a volume to segment (the network's patches need
#: some context; a single slice or a thin crop yields nothing useful).
MIN_VOXELS_PER_AXIS = 16


#: Default tolerance (mm, elementwise on the 4x4 affine) for files to share a grid.
AFFINE_ATOL = 1e-3


#: Every ``InputError.code``.
ERROR_CODES: tuple[str, ...] = (
    "not_found",
    "not_nifti",
    "unreadable",
    "not_3d",
    "not_4d",
    "shape_mismatch",
    "affine_mismatch",
    "bad_affine",
    "non_finite",
    "empty_volume",
    "bad_voxel_size",
    "missing_modality",
    "unknown_modality",
    "ambiguous_files",
    "bad_labels",
    "unsupported_dtype",
    "too_small",
    # DICOM studies (model/io/dicom/study.py)
    "not_dicom",
    "too_large",
    "unknown_series",
    "ambiguous_series",
    "unsupported_series",
    "derived_series",
    "multiframe",
    "mixed_orientation",
    "inconsistent_slices",
    "duplicate_slices",
    "gantry_tilt",
    "uneven_spacing",
    "frame_of_reference_mismatch",
    "patient_mismatch",
)


class InputError(ValueError):
    """An input file or case cannot be used; the message says why and how to fix it.

    Attributes:
        code: stable snake_case identifier of the problem, one of :data:`ERROR_CODES`.
        path: the offending file or folder, when there is one.
    """

    def __init__(self, code: str, message: str, path: PathLike | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"code must be one of {ERROR_CODES}, got {code!r}")
        super().__init__(message)
        self.code = code
        self.path = None if path is None else str(path)


@dataclass(frozen=True)
class Case:
    """The four co-registered modalities of one case.

    Attributes:
        images: float32 array ``(4, X, Y, Z)`` in :data:`MODALITIES` order.
        affine: 4x4 voxel-to-world affine shared by the modalities.
        header: copy of the reference file's header (T1, or the 4D file).
        spacing: voxel edge lengths in mm, from the header zooms.
        name: case name (folder name, or file name without modality suffix).
        sources: modality -> file it was read from.
    """

    images: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]
    name: str
    sources: dict[str, Path] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial grid ``(X, Y, Z)``."""
        _, x, y, z = self.images.shape
        return int(x), int(y), int(z)
