"""Writing MR image series as DICOM, one file per slice: test studies made from volumes.

:func:`write_study` turns the four modalities of a case (a BraTS case, or the phantom
of :mod:`model.io.phantom`) into one DICOM study: four MR Image Storage series that share
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
normal (:mod:`model.io.dicom.study`), which gives the same voxel order as long as the
affine's third column points along the normal (true of any right-handed grid in
voxel order, e.g. BraTS's LPS-stored files and the phantom's RAS grid).

An :class:`Acquisition` with a ``plane`` resamples the volume (trilinear, in physical
space, :func:`model.io.resample.resample_to_grid`) onto an axial, coronal or sagittal
grid, optionally tilted by ``angle_deg`` about its row direction, covering the
volume's voxel centres; a grid whose voxel centres coincide with the volume's is
copied exactly instead.

Voxel values are stored as 16-bit integers: unchanged when they are integers that fit
(int16, or uint16 when none is negative), otherwise mapped linearly onto 0-65535 with
RescaleSlope / RescaleIntercept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from model.io.dicom.protocols import (
    PLANE_ABBREVIATIONS,
    PROTOCOLS,
    SERIES_NUMBERS,
    Acquisition,
    MRProtocol,
    SliceGeometry,
    StudyInfo,
    WrittenSeries,
    acquisition_grid,
    plane_of,
    slice_geometry,
)
from model.io.resample import resample_to_grid
from model.io.volumes import MODALITIES

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


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
    ds.ProtocolName = f"{protocol.protocol_name}_{PLANE_ABBREVIATIONS[plane]}"
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
    plane = plane_of(geometry.normal)
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
        images: ``(4, X, Y, Z)`` in :data:`~model.io.volumes.MODALITIES` order, e.g. a
            loaded :class:`~model.io.volumes.Case`'s ``images``.
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
