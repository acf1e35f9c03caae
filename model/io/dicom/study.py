"""Reading a DICOM study (a folder or a zip file) into a :class:`~model.io.volumes.Case`.

:func:`read_dicom_study` is the one path from DICOM to the segmentation pipeline:

1. **Scan**: every file of the folder (searched recursively) or zip member is read as
   DICOM, headers only; other files are skipped. Instances are grouped into series by
   SeriesInstanceUID. A multi-frame image (Enhanced MR, Legacy Converted Enhanced MR)
   counts as one image per frame, each with the header that frame sees: its per-frame
   functional groups (PlanePositionSequence, PlaneOrientationSequence,
   PixelMeasuresSequence, PixelValueTransformationSequence, the MR echo, timing and
   modifier macros), then the shared ones, then the file's own attributes
   (:func:`frame_headers`), so that everything below treats frames and classic
   single-frame images alike.
2. **Map series to modalities**: explicit overrides (``{"t1ce": SeriesInstanceUID}``, or
   a SeriesNumber) first; then :data:`DEFAULT_RULES`, regular expressions on the
   SeriesDescription, ProtocolName and SequenceName (each a :class:`SeriesRule`; the
   caller may pass its own), with the contrast agent (ContrastBolusAgent, or words such
   as "post", "gad", "+C" in the text) telling T1ce from T1; a series no text rule
   matches is classified by its sequence attributes (:func:`classify_by_sequence`: TR,
   TE, TI, inversion recovery). Series that cannot be a modality volume (not MR, Enhanced
   MR or Legacy Converted Enhanced MR Image Storage; multi-frame images that do not say
   where each frame lies; localizers, projections, colour) are never picked by the rules;
   among several candidates for one modality, ORIGINAL images win over DERIVED ones
   (reformats). A modality with no series, or with several, raises ``missing_modality``
   or ``ambiguous_series`` with a list of every series found and how it was classified.
3. **Check each series** before converting it: one orientation
   (``mixed_orientation``), one image size and pixel spacing (``inconsistent_slices``),
   one image per slice position (``duplicate_slices``: echoes, time points or b-values
   stacked in one series), slice positions along the slice normal (``gantry_tilt``,
   also from GantryDetectorTilt), evenly spaced (``uneven_spacing``, e.g. a missing
   slice), at least two slices (``not_3d``); pixel data in a transfer syntax that can
   be decoded (``unsupported_series``); the four series share one FrameOfReferenceUID
   (``frame_of_reference_mismatch``) and one PatientID (``patient_mismatch``).
4. **Convert** each series to a volume (below), on the grid: x along the rows (column
   index), y along the columns (row index), z the slices sorted along the normal
   (row direction x column direction), with the NIfTI affine (RAS) of that grid.
5. **Resample** T1, T2 and FLAIR onto the T1ce grid in physical space (trilinear, no
   registration: the shared frame of reference is trusted) when their grid differs by
   more than :data:`~model.io.volumes.AFFINE_ATOL` mm; a series already on the T1ce grid,
   or whose voxel centres coincide with it in another order, is copied exactly
   (:func:`model.io.resample.resample_to_grid`).
6. **Warn** when the T1ce does not look skull-stripped (:func:`skull_stripping_warning`);
   the network was trained on skull-stripped BraTS scans.

The resulting case is on the T1ce grid, so :func:`model.inference.case.process_case` segments it
unchanged and its label map lies on the T1ce series' slices, as a DICOM SEG needs
(:mod:`model.io.dicom.seg`; :attr:`DicomStudy.reference` holds the T1ce headers in
slice order).

Converter. Frames of multi-frame images are decoded by pydicom (its own decoders for
uncompressed, deflated, big-endian and RLE data; pyjpegls for JPEG-LS; pylibjpeg-openjpeg
for JPEG 2000), each frame rescaled by its own slope and intercept. Single-frame images
are decoded by SimpleITK (``ImageSeriesReader``, GDCM inside),
given the exact, checked and sorted file list; the geometry is this module's own,
computed from the headers it checked. Measured with ``python bench/dicom_converters.py
--repeats 5`` on Brats18_CBICA_AMH_1 written as DICOM (T1, T1ce, FLAIR axial, T2
sagittal, and a FLAIR on coronal slices tilted 12 degrees with rescaled values;
240 x 240 x 155; 2-core CPU shared with a training job): SimpleITK, dcm2niix,
dicom2nifti and plain pydicom all gave the exact volumes (the tilted FLAIR within its
16-bit storage step, 0.007) on the right grids; mean seconds per series (median of 5
runs each, range over the 5 series): dcm2niix 0.06 (0.04-0.10), SimpleITK 0.17
(0.13-0.28), pydicom 0.30 (0.21-0.47), dicom2nifti 0.52 (0.34-0.83). SimpleITK is used:
it runs in-process on the file list chosen and checked here (dcm2niix and dicom2nifti
take a folder and group and sort its files by their own rules, so a zip or a folder of
several series would first be copied into per-series folders, and dcm2niix is a
separate program from a system package, not a pip dependency, that writes files to
read back); it decodes the compressed transfer syntaxes (JPEG lossless, JPEG-LS, JPEG
2000, RLE) itself, where pydicom needs plugin packages (pylibjpeg, python-gdcm or
pyjpegls) for most of them; and the 0.1 s per series it loses to dcm2niix is nothing
beside the minutes of inference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from model.io.dicom.classify import DEFAULT_RULES, SeriesRule, map_series
from model.io.dicom.scan import MAX_STUDY_BYTES, SeriesInfo, scan_study
from model.io.dicom.slices import SliceStack, read_volume, slice_stack
from model.io.resample import resample_to_grid
from model.io.volumes import AFFINE_ATOL, MODALITIES, Case, InputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


#: The modality whose grid the case is put on (the SEG references its series).
GRID_MODALITY = "t1ce"


#: A brain (skull-stripped) is 1-2 L; a whole head is larger.
HEAD_VOLUME_ML = 2000.0


#: Skull-stripped scans are zero outside the brain: at least this share of the grid.
MIN_BACKGROUND_FRACTION = 0.1


def skull_stripping_warning(volume: np.ndarray, affine: np.ndarray) -> str | None:
    """A warning when a volume does not look skull-stripped, else None.

    Skull-stripped scans (what the network was trained on) are exactly zero outside the
    brain, a region of 1-2 L. Warns when fewer than :data:`MIN_BACKGROUND_FRACTION` of
    the voxels hold the volume's minimum, or when the voxels above it make more than
    :data:`HEAD_VOLUME_ML` mL.
    """
    vol = np.asarray(volume)
    low = float(vol.min())
    background = float(np.mean(vol == low))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    tissue_ml = float(np.count_nonzero(vol > low)) * voxel_ml
    if background < MIN_BACKGROUND_FRACTION or tissue_ml > HEAD_VOLUME_ML:
        return (
            f"the T1ce does not look skull-stripped ({background:.0%} of the voxels are "
            f"background, {tissue_ml:.0f} mL are not); the model was trained on "
            "skull-stripped scans, so expect false positives outside the brain. Strip the "
            "skull (e.g. with HD-BET or SynthStrip) before segmenting"
        )
    return None


@dataclass(frozen=True)
class DicomStudy:
    """A DICOM study read as a case.

    Attributes:
        case: the four modalities on the T1ce grid.
        series: modality -> the series used.
        reference: the T1ce instances' headers, in slice order (the case's z axis);
            what a DICOM SEG of the case references. For a multi-frame T1ce, the
            header of the file each slice is a frame of.
        others: the study's series that were not used.
        resampled: the modalities resampled (or only reordered) onto the T1ce grid.
        warnings: things the user should know (e.g. not skull-stripped).
        frames: for a multi-frame T1ce, the frame number of each slice in its file;
            () for single-frame images.
    """

    case: Case
    series: dict[str, SeriesInfo]
    reference: tuple[Dataset, ...]
    others: tuple[SeriesInfo, ...] = ()
    resampled: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    frames: tuple[int, ...] = ()

    def summary(self) -> dict[str, object]:
        """A JSON-ready account: the series used per modality, those resampled, the
        warnings."""
        return {
            "series": {
                m: {"uid": s.uid, "number": s.number, "description": s.description}
                for m, s in self.series.items()
            },
            "resampled": list(self.resampled),
            "warnings": list(self.warnings),
        }


def _header(affine: np.ndarray, shape: tuple[int, int, int]) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_qform(affine, code="scanner")
    header.set_sform(affine, code="scanner")
    header.set_xyzt_units("mm")
    return header


def _check_shared(series: Mapping[str, SeriesInfo], keyword: str, code: str, place: Path) -> None:
    values = {m: str(s.first.get(keyword, "") or "") for m, s in series.items()}
    if len(set(values.values())) > 1:
        listing = ", ".join(f"{m}: {v or 'none'}" for m, v in values.items())
        what = {
            "frame_of_reference_mismatch": "do not share one frame of reference, so their "
            "positions cannot be related without registration. Register them first, or "
            "choose series of one session",
            "patient_mismatch": "belong to different patients. Choose the four series of "
            "one patient",
        }[code]
        raise InputError(
            code, f"the four series of DICOM study {place} {what} ({keyword} {listing})", place
        )


@dataclass(frozen=True)
class StudyLayout:
    """What the header-only checks of a study found (:func:`check_dicom_study`).

    Attributes:
        root: the study folder or zip file.
        series: modality -> the series chosen.
        stacks: modality -> its checked slices and grid.
        others: the study's series that were not chosen.
    """

    root: Path
    series: dict[str, SeriesInfo]
    stacks: dict[str, SliceStack]
    others: tuple[SeriesInfo, ...] = ()


def check_dicom_study(
    path: PathLike,
    *,
    rules: Sequence[SeriesRule] = DEFAULT_RULES,
    overrides: Mapping[str, str] | None = None,
    use_sequence: bool = True,
    max_bytes: int = MAX_STUDY_BYTES,
) -> StudyLayout:
    """Steps 1 to 3 of the module docstring, on headers only: finds the series, maps
    them to modalities and checks their geometry. Cheap enough to run before a job is
    queued; :func:`read_dicom_study` runs it first.

    Raises:
        InputError: the study cannot be used safely; ``code`` says why.
    """
    root = Path(path)
    all_series = scan_study(root, max_bytes=max_bytes)
    chosen = map_series(
        all_series, rules=rules, overrides=overrides, use_sequence=use_sequence, where=root
    )
    _check_shared(chosen, "PatientID", "patient_mismatch", root)
    _check_shared(chosen, "FrameOfReferenceUID", "frame_of_reference_mismatch", root)
    stacks = {m: slice_stack(s, m, root) for m, s in chosen.items()}
    used = {s.uid for s in chosen.values()}
    others = tuple(s for s in all_series if s.uid not in used)
    return StudyLayout(root, chosen, stacks, others)


def _volumes_on_grid(layout: StudyLayout, affine_atol: float) -> tuple[np.ndarray, list[str]]:
    """The four modalities decoded and brought onto the T1ce grid (step 4 and 5): the
    ``(4, X, Y, Z)`` images and the modalities that were resampled."""
    root, stacks = layout.root, layout.stacks
    grid = stacks[GRID_MODALITY]
    images = np.empty((len(MODALITIES), *grid.shape), dtype=np.float32)
    resampled = []
    for c, modality in enumerate(MODALITIES):
        stack = stacks[modality]
        what = f"{modality} {layout.series[modality].label()}"
        volume = read_volume(stack, what, root)
        if not np.all(np.isfinite(volume)):
            raise InputError("non_finite", f"{what} holds non-finite values", root)
        if not np.any(volume):
            raise InputError(
                "empty_volume",
                f"{what} is zero everywhere; it is probably the wrong series. Name the "
                f"right one, {modality}=<SeriesInstanceUID>",
                root,
            )
        same = (
            stack.shape == grid.shape and np.max(np.abs(stack.affine - grid.affine)) <= affine_atol
        )
        if same:
            images[c] = volume
            continue
        images[c] = resample_to_grid(volume, stack.affine, grid.shape, grid.affine, order=1)
        resampled.append(modality)
        logger.info("%s resampled onto the T1ce grid", what)
    return images, resampled


def read_dicom_study(
    path: PathLike,
    *,
    name: str | None = None,
    rules: Sequence[SeriesRule] = DEFAULT_RULES,
    overrides: Mapping[str, str] | None = None,
    use_sequence: bool = True,
    max_bytes: int = MAX_STUDY_BYTES,
    affine_atol: float = AFFINE_ATOL,
) -> DicomStudy:
    """Reads a DICOM study (folder or zip) as a case on the T1ce grid.

    See the module docstring for the steps and the checks.

    Args:
        path: the study folder (searched recursively) or ``.zip`` file.
        name: the case name; default: the folder or zip name (without ``.zip``).
        rules: how series are recognised (:data:`DEFAULT_RULES`).
        overrides: modality -> SeriesInstanceUID (or a unique SeriesNumber).
        use_sequence: classify series no rule matches by their sequence attributes.
        max_bytes: refuse studies larger than this.
        affine_atol: grids whose affines differ by less (mm) count as the T1ce grid.

    Returns:
        The study, its case and what was done to it.

    Raises:
        InputError: the study cannot be used safely; ``code`` says why.
    """
    layout = check_dicom_study(
        path, rules=rules, overrides=overrides, use_sequence=use_sequence, max_bytes=max_bytes
    )
    root = layout.root
    grid = layout.stacks[GRID_MODALITY]
    images, resampled = _volumes_on_grid(layout, affine_atol)
    warnings = []
    warning = skull_stripping_warning(images[MODALITIES.index(GRID_MODALITY)], grid.affine)
    if warning:
        warnings.append(warning)
        logger.warning("%s: %s", root, warning)
    zooms = np.linalg.norm(grid.affine[:3, :3], axis=0)
    case_name = name or (
        root.name[: -len(".zip")] if root.name.lower().endswith(".zip") else root.name
    )
    case = Case(
        images=images,
        affine=grid.affine.copy(),
        header=_header(grid.affine, grid.shape),
        spacing=(float(zooms[0]), float(zooms[1]), float(zooms[2])),
        name=case_name,
        sources={m: root for m in MODALITIES},
    )
    return DicomStudy(
        case=case,
        series=layout.series,
        reference=grid.reference,
        others=layout.others,
        resampled=tuple(resampled),
        warnings=tuple(warnings),
        frames=grid.frames,
    )
