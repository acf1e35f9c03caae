"""The acquisitions of a written test study: MR protocols per modality, planes, grids and
slice geometry (used by :mod:`model.io.dicom.write_series`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

#: RAS <-> LPS: negate x and y (the matrix is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


#: Acquisition planes: (row direction, column direction) in LPS, as DICOM writes
#: ImageOrientationPatient for a standard head acquisition.
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


#: Short plane names as scanners put them in ProtocolName.
PLANE_ABBREVIATIONS = {"axial": "tra", "coronal": "cor", "sagittal": "sag"}


@dataclass(frozen=True)
class MRProtocol:
    """The acquisition attributes written into every image of a series.

    Attributes:
        series_description: SeriesDescription, e.g. "T1 post contrast".
        protocol_name: ProtocolName stem; the plane ("tra", "cor", "sag") is appended.
        scanning_sequence: ScanningSequence, e.g. "SE" or ["SE", "IR"].
        sequence_variant: SequenceVariant.
        scan_options: ScanOptions (empty for none).
        sequence_name: SequenceName as a Siemens scanner writes it.
        repetition_time: TR in ms.
        echo_time: TE in ms.
        inversion_time: TI in ms, or None.
        flip_angle: in degrees.
        echo_train_length: echoes per excitation.
        contrast_agent: ContrastBolusAgent, or None before contrast.
    """

    series_description: str
    protocol_name: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    sequence_name: str
    repetition_time: float
    echo_time: float
    inversion_time: float | None
    flip_angle: float
    echo_train_length: int
    contrast_agent: str | None = None


#: A typical 3 T brain-tumour protocol, one entry per modality.
PROTOCOLS: dict[str, MRProtocol] = {
    "t1": MRProtocol(
        "T1", "t1_se", ("SE",), ("SK", "SP"), ("SP",), "*se2d1", 550.0, 9.0, None, 90.0, 1
    ),
    "t1ce": MRProtocol(
        "T1 post contrast",
        "t1_se_post",
        ("SE",),
        ("SK", "SP"),
        ("SP",),
        "*se2d1",
        550.0,
        9.0,
        None,
        90.0,
        1,
        "Gadobutrol",
    ),
    "t2": MRProtocol(
        "T2",
        "t2_tse",
        ("SE",),
        ("SK", "SP", "OSP"),
        (),
        "*tse2d1_15",
        5000.0,
        95.0,
        None,
        150.0,
        15,
    ),
    "flair": MRProtocol(
        "FLAIR",
        "t2_tirm_dark-fluid",
        ("SE", "IR"),
        ("SK", "SP", "MP"),
        ("SP",),
        "*tir2d1_16",
        9000.0,
        81.0,
        2500.0,
        150.0,
        16,
    ),
}


#: Series numbers of the four series in :func:`write_study`.
SERIES_NUMBERS: dict[str, int] = {"t1": 3, "t1ce": 7, "t2": 4, "flair": 5}


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes shared by every series of a study.

    The UIDs default to new random ones, so each :class:`StudyInfo` is its own study.
    """

    patient_name: str = "OMNET^TEST"
    patient_id: str = "OMNET-TEST"
    patient_birth_date: str = "19700101"
    patient_sex: str = "O"
    study_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_id: str = "1"
    accession_number: str = ""
    study_description: str = "MR BRAIN WITH AND WITHOUT CONTRAST"
    study_date: str = "20240101"
    study_time: str = "120000"
    manufacturer: str = "omnet"
    manufacturer_model_name: str = "synthetic"
    magnetic_field_strength: float = 3.0


@dataclass(frozen=True)
class Acquisition:
    """How a series is acquired from a volume.

    Attributes:
        plane: None keeps the volume's own grid; "axial", "coronal" or "sagittal"
            resamples it onto slices in that plane.
        spacing: with a plane, the voxel size (mm) along the rows, the columns and the
            slices, i.e. (column spacing, row spacing, slice spacing); default: the
            volume's voxel size along the closest axes.
        angle_deg: with a plane, a tilt of the slices about their row direction.
    """

    plane: str | None = None
    spacing: tuple[float, float, float] | None = None
    angle_deg: float = 0.0


@dataclass(frozen=True)
class WrittenSeries:
    """A series written to disk.

    Attributes:
        modality: the case modality (t1, t1ce, t2, flair).
        series_instance_uid: its SeriesInstanceUID.
        files: one file per slice, in slice order.
        shape: the grid written, ``(columns, rows, slices)``.
        affine: the grid's voxel-to-world affine (RAS, mm).
    """

    modality: str
    series_instance_uid: str
    files: tuple[Path, ...]
    shape: tuple[int, int, int]
    affine: np.ndarray


def acquisition_grid(
    shape: tuple[int, int, int],
    affine: np.ndarray,
    plane: str,
    spacing: tuple[float, float, float] | None = None,
    angle_deg: float = 0.0,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid of slices in ``plane`` covering the voxel centres of ``(shape, affine)``.

    Args:
        shape: the source grid.
        affine: its voxel-to-world affine (RAS).
        plane: "axial", "coronal" or "sagittal".
        spacing: (column, row, slice) spacing in mm; default: the source voxel size
            along the source axis closest to each new direction.
        angle_deg: tilt about the row direction.

    Returns:
        ``(shape, affine)`` of the new grid (RAS).

    Raises:
        ValueError: unknown plane, bad spacing.
    """
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {sorted(PLANES)}, got {plane!r}")
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    row = np.asarray(PLANES[plane][0])
    col = np.asarray(PLANES[plane][1])
    normal = np.cross(row, col)
    angle = math.radians(angle_deg)
    col, normal = (
        math.cos(angle) * col + math.sin(angle) * normal,
        math.cos(angle) * normal - math.sin(angle) * col,
    )
    directions = np.stack([row, col, normal], axis=1)  # (3, 3) LPS, one per column
    if spacing is None:
        zooms = np.linalg.norm(lps[:3, :3], axis=0)
        units = lps[:3, :3] / zooms
        steps = np.array([zooms[int(np.argmax(np.abs(units.T @ d)))] for d in directions.T])
    else:
        steps = np.asarray(spacing, dtype=np.float64)
        if steps.shape != (3,) or not np.all(np.isfinite(steps)) or np.any(steps <= 0):
            raise ValueError(f"spacing must be three positive numbers, got {spacing!r}")
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for k in (0, shape[2] - 1)
        ]
    )
    world = (lps @ corners.T)[:3]  # (3, 8) LPS
    projected = directions.T @ world  # (3, 8) along row, col, normal
    low, high = projected.min(axis=1), projected.max(axis=1)
    counts = np.floor((high - low) / steps + 1e-6).astype(int) + 1
    grid = np.eye(4)
    grid[:3, :3] = directions * steps
    grid[:3, 3] = directions @ low
    return (int(counts[0]), int(counts[1]), int(counts[2])), RAS_TO_LPS @ grid


@dataclass(frozen=True)
class SliceGeometry:
    """DICOM geometry of the slices of a grid (see the module docstring).

    Attributes:
        orientation: ImageOrientationPatient (row direction, column direction; LPS).
        pixel_spacing: PixelSpacing, [row spacing, column spacing] in mm.
        positions: ImagePositionPatient of each slice (LPS, mm).
        normal: the slice normal, row direction x column direction.
        slice_step: distance between neighbouring slices along the normal (mm).
    """

    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    positions: tuple[np.ndarray, ...]
    normal: np.ndarray
    slice_step: float


def slice_geometry(affine: np.ndarray, n_slices: int) -> SliceGeometry:
    """The DICOM slice geometry of ``n_slices`` slices of the grid ``affine`` (RAS).

    Raises:
        ValueError: the grid's first two axes are not perpendicular.
    """
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    col0, col1, col2 = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    row_dir = col0 / np.linalg.norm(col0)
    col_dir = col1 / np.linalg.norm(col1)
    if abs(float(row_dir @ col_dir)) > 1e-6:
        raise ValueError("the affine's first two axes must be perpendicular to be DICOM slices")
    normal = np.cross(row_dir, col_dir)
    return SliceGeometry(
        orientation=(*row_dir.tolist(), *col_dir.tolist()),
        pixel_spacing=(float(np.linalg.norm(col1)), float(np.linalg.norm(col0))),
        positions=tuple(lps[:3, 3] + k * col2 for k in range(n_slices)),
        normal=normal,
        slice_step=abs(float(col2 @ normal)),
    )


def plane_of(normal: np.ndarray) -> str:
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]
