"""Writing MR image series as DICOM, one file per slice: test studies made from volumes.

:func:`write_study` turns the four modalities of a case (a BraTS case, or the phantom
of :mod:`model.phantom`) into one DICOM study: four MR Image Storage series that share
the StudyInstanceUID, the FrameOfReferenceUID and the patient, each with its own
SeriesDescription ("T1", "T1 post contrast", "T2", "FLAIR"; :data:`PROTOCOLS`) and
realistic acquisition attributes (sequence, TR/TE/TI, field strength, contrast agent
for the T1ce). :func:`write_mr_series` writes one series.

Geometry. A volume ``(X, Y, Z)`` with a NIfTI voxel-to-world affine (RAS+, mm) becomes
``Z`` slices; slice ``k`` holds ``volume[:, :, k].T`` (DICOM rows run along the
volume's second axis, columns along its first). World coordinates are converted from
RAS to DICOM's LPS (x and y negated), so that

* ImageOrientationPatient = the LPS directions of the affine's first two columns
  (the row direction, then the column direction);
* PixelSpacing = [row spacing, column spacing] = lengths of the second and first
  columns;
* ImagePositionPatient of slice ``k`` = the LPS position of voxel ``(0, 0, k)``;
* SliceThickness = SpacingBetweenSlices = the slice step along the slice normal
  (row direction x column direction).

A sheared affine (third column not along the normal) is written as it is, which is how
tests make a gantry-tilted series. Reading the series back sorts slices along the
normal (:mod:`model.dicom_study`), which gives the same voxel order as long as the
affine's third column points along the normal (true of any right-handed grid in
voxel order, e.g. BraTS's LPS-stored files and the phantom's RAS grid).

An :class:`Acquisition` with a ``plane`` resamples the volume (trilinear, in physical
space, :func:`model.resample.resample_to_grid`) onto an axial, coronal or sagittal
grid, optionally tilted by ``angle_deg`` about its row direction, covering the
volume's voxel centres; a grid whose voxel centres coincide with the volume's is
copied exactly instead.

Voxel values are stored as 16-bit integers: unchanged when they are integers that fit
(int16, or uint16 when none is negative), otherwise mapped linearly onto 0-65535 with
RescaleSlope / RescaleIntercept.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from model.nifti_io import MODALITIES
from model.resample import resample_to_grid

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

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
_PLANE_ABBREVIATIONS = {"axial": "tra", "coronal": "cor", "sagittal": "sag"}


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


# --------------------------------------------------------------------------- geometry


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


def _plane_of(normal: np.ndarray) -> str:
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


# --------------------------------------------------------------------------- pixels


def _encode(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """16-bit stored values and (slope, intercept) with value = stored * slope + intercept."""
    v = np.asarray(volume, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("volume holds NaN or infinite values; DICOM stores finite numbers")
    lo, hi = float(v.min()), float(v.max())
    if np.array_equal(v, np.round(v)):
        if lo >= 0 and hi <= 65535:
            return v.astype(np.uint16), 1.0, 0.0
        if lo >= -32768 and hi <= 32767:
            return v.astype(np.int16), 1.0, 0.0
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.round((v - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo


def _format_ds(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM's DS limit)."""
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.6g}"
    return "0" if text in ("-0", "-0.0") else text


# --------------------------------------------------------------------------- writing


def _dataset(
    path: Path,
    protocol: MRProtocol,
    study: StudyInfo,
    series_uid: str,
    series_number: int,
    plane: str,
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = study.manufacturer
    ds.ManufacturerModelName = study.manufacturer_model_name
    ds.InstitutionName = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = protocol.series_description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = list(protocol.scanning_sequence)
    ds.SequenceVariant = list(protocol.sequence_variant)
    ds.ScanOptions = list(protocol.scan_options) if protocol.scan_options else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = protocol.sequence_name
    ds.RepetitionTime = _format_ds(protocol.repetition_time)
    ds.EchoTime = _format_ds(protocol.echo_time)
    if protocol.inversion_time is not None:
        ds.InversionTime = _format_ds(protocol.inversion_time)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = _format_ds(42.577478 * study.magnetic_field_strength)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _format_ds(study.magnetic_field_strength)
    ds.EchoTrainLength = str(protocol.echo_train_length)
    ds.FlipAngle = _format_ds(protocol.flip_angle)
    ds.ProtocolName = f"{protocol.protocol_name}_{_PLANE_ABBREVIATIONS[plane]}"
    ds.PatientPosition = "HFS"
    if protocol.contrast_agent is not None:
        ds.ContrastBolusAgent = protocol.contrast_agent
        ds.ContrastBolusRoute = "IV"
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def write_mr_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: PathLike,
    modality: str,
    *,
    study: StudyInfo,
    series_number: int = 1,
    acquisition: Acquisition | None = None,
    series_instance_uid: str | None = None,
    protocol: MRProtocol | None = None,
) -> WrittenSeries:
    """Writes one MR series, one file per slice, into ``folder`` (created).

    Args:
        volume: the 3D image ``(X, Y, Z)``; finite real values.
        affine: its voxel-to-world affine (NIfTI RAS, mm).
        folder: where the files ``IM0001.dcm``, ... go.
        modality: t1, t1ce, t2 or flair; picks the default protocol.
        study: patient and study attributes, shared by a study's series.
        series_number: SeriesNumber.
        acquisition: the acquisition plane and grid (default: the volume's own grid).
        series_instance_uid: default: a new UID.
        protocol: default: ``PROTOCOLS[modality]``.

    Returns:
        What was written.

    Raises:
        ValueError: bad modality, volume or affine.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    vol, aff = _acquired(volume, affine, acquisition or Acquisition())
    geometry = slice_geometry(aff, vol.shape[2])
    protocol = protocol or PROTOCOLS[modality]
    series_uid = series_instance_uid or generate_uid()
    stored, slope, intercept = _encode(vol)
    nonzero = vol[vol != 0]
    low, high = np.percentile(nonzero, (1, 99)) if nonzero.size else (0.0, 1.0)
    window = (float(low + high) / 2, max(float(high - low), 1.0))
    plane = _plane_of(geometry.normal)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for k in range(vol.shape[2]):
        path = out / f"IM{k + 1:04d}.dcm"
        ds = _dataset(path, protocol, study, series_uid, series_number, plane)
        _set_slice(ds, k, geometry, stored[:, :, k], (slope, intercept), window)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    logger.debug("wrote %s series %s: %d slices in %s", modality, series_uid, len(files), out)
    return WrittenSeries(
        modality,
        series_uid,
        tuple(files),
        (int(vol.shape[0]), int(vol.shape[1]), int(vol.shape[2])),
        aff,
    )


def _acquired(
    volume: np.ndarray, affine: np.ndarray, acquisition: Acquisition
) -> tuple[np.ndarray, np.ndarray]:
    """The volume and affine as ``acquisition`` sees them (resampled onto its plane)."""
    vol = np.asarray(volume)
    if vol.ndim != 3 or vol.dtype.kind not in "iuf":
        raise ValueError(f"volume must be a 3D real array, got shape {vol.shape} {vol.dtype}")
    aff = np.asarray(affine, dtype=np.float64)
    if acquisition.plane is None:
        return vol, aff
    shape, aff_out = acquisition_grid(
        (vol.shape[0], vol.shape[1], vol.shape[2]),
        aff,
        acquisition.plane,
        acquisition.spacing,
        acquisition.angle_deg,
    )
    return resample_to_grid(vol, aff, shape, aff_out, order=1), aff_out


def _set_slice(
    ds: Dataset,
    k: int,
    geometry: SliceGeometry,
    stored: np.ndarray,
    rescale: tuple[float, float],
    window: tuple[float, float],
) -> None:
    """Slice ``k``'s position, geometry and pixels (``stored``: ``(X, Y)``)."""
    step = geometry.slice_step
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_format_ds(float(x)) for x in geometry.positions[k]]
    ds.ImageOrientationPatient = [_format_ds(x) for x in geometry.orientation]
    ds.SliceLocation = _format_ds(float(geometry.positions[k] @ geometry.normal))
    ds.SliceThickness = _format_ds(step)
    ds.SpacingBetweenSlices = _format_ds(step)
    ds.PixelSpacing = [_format_ds(x) for x in geometry.pixel_spacing]
    pixels = np.ascontiguousarray(stored.T)  # (rows, columns)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    slope, intercept = rescale
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleIntercept = _format_ds(intercept)
        ds.RescaleSlope = _format_ds(slope)
    ds.WindowCenter = _format_ds(window[0])
    ds.WindowWidth = _format_ds(window[1])
    ds.PixelData = pixels.tobytes()


def write_study(
    images: np.ndarray,
    affine: np.ndarray,
    folder: PathLike,
    *,
    study: StudyInfo | None = None,
    acquisitions: Mapping[str, Acquisition] | None = None,
) -> dict[str, WrittenSeries]:
    """Writes the four modalities of a case as one DICOM study.

    Each series goes into ``folder/<SeriesNumber>_<modality>/`` (numbers from
    :data:`SERIES_NUMBERS`); all four share the study's patient, StudyInstanceUID and
    FrameOfReferenceUID.

    Args:
        images: ``(4, X, Y, Z)`` in :data:`~model.nifti_io.MODALITIES` order, e.g. a
            loaded :class:`~model.nifti_io.Case`'s ``images``.
        affine: their voxel-to-world affine (RAS).
        folder: the study folder (created).
        study: patient and study attributes; default: a new test study.
        acquisitions: modality -> acquisition (default: every modality on the case's
            own grid).

    Returns:
        Modality -> the series written.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] != len(MODALITIES):
        raise ValueError(f"images must have shape (4, X, Y, Z), got {arr.shape}")
    study = study or StudyInfo()
    acquisitions = acquisitions or {}
    unknown = sorted(set(acquisitions) - set(MODALITIES))
    if unknown:
        raise ValueError(f"acquisitions has unknown modalities {unknown}; use {MODALITIES}")
    written: dict[str, WrittenSeries] = {}
    for c, modality in enumerate(MODALITIES):
        number = SERIES_NUMBERS[modality]
        written[modality] = write_mr_series(
            arr[c],
            affine,
            Path(folder) / f"{number:03d}_{modality}",
            modality,
            study=study,
            series_number=number,
            acquisition=acquisitions.get(modality),
        )
    return written
