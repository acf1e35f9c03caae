"""Reading a DICOM study (a folder or a zip file) into a :class:`~model.nifti_io.Case`.

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
   more than :data:`~model.nifti_io.AFFINE_ATOL` mm; a series already on the T1ce grid,
   or whose voxel centres coincide with it in another order, is copied exactly
   (:func:`model.resample.resample_to_grid`).
6. **Warn** when the T1ce does not look skull-stripped (:func:`skull_stripping_warning`);
   the network was trained on skull-stripped BraTS scans.

The resulting case is on the T1ce grid, so :func:`model.case.process_case` segments it
unchanged and its label map lies on the T1ce series' slices, as a DICOM SEG needs
(:mod:`model.dicom_outputs`; :attr:`DicomStudy.reference` holds the T1ce headers in
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

import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MRImageStorage

from model.nifti_io import (
    AFFINE_ATOL,
    MAX_VOXEL_MM,
    MIN_VOXEL_MM,
    MODALITIES,
    Case,
    InputError,
)
from model.resample import resample_to_grid

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: RAS <-> LPS: negate x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: The modality whose grid the case is put on (the SEG references its series).
GRID_MODALITY = "t1ce"

#: Enhanced MR Image Storage and Legacy Converted Enhanced MR Image Storage: multi-frame
#: series, read frame by frame like classic ones (:func:`frame_headers`).
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
#: The SOP classes a modality series may have.
MR_VOLUME_STORAGE = frozenset(
    {str(MRImageStorage), ENHANCED_MR_STORAGE, LEGACY_CONVERTED_MR_STORAGE}
)

#: Transfer syntaxes whose pixel data SimpleITK (GDCM) decodes in single-frame series:
#: uncompressed, deflated, big-endian, JPEG (baseline, extended, lossless), JPEG-LS,
#: JPEG 2000 and RLE. Multi-frame images are decoded by pydicom, with the decoders
#: installed (:func:`_decodable`).
SINGLE_FRAME_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    }
)

#: ImageType values of images that are not a slice of an intensity volume.
NOT_A_VOLUME_IMAGE_TYPES = frozenset(
    {
        "LOCALIZER",
        "PROJECTION IMAGE",
        "MIP",
        "MINIP",
        "SCREEN SHOT",
        "SCREENSHOT",
        "CURVED",
        "CPR",
        "SUBTRACTION",
        "ADC",
        "TRACEW",
        "FA",
        "COLFA",
        "EADC",
        "PHASE MAP",
        "P",
    }
)

#: Largest allowed difference between the image orientation vectors of two slices.
ORIENTATION_TOLERANCE = 1e-4
#: Largest allowed sine of the angle between the slice step and the slice normal.
TILT_TOLERANCE = 1e-3
#: Largest deviation of a slice position from an even grid, as a share of the step.
SPACING_RTOL = 0.01
#: Default limit on the bytes a study (a folder, or a zip uncompressed) may hold.
MAX_STUDY_BYTES = 8 * 1024**3

#: A brain (skull-stripped) is 1-2 L; a whole head is larger.
HEAD_VOLUME_ML = 2000.0
#: Skull-stripped scans are zero outside the brain: at least this share of the grid.
MIN_BACKGROUND_FRACTION = 0.1


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class SeriesRule:
    """A modality recognised from a series' text (SeriesDescription, ProtocolName,
    SequenceName, lower case, with ``_-./`` read as spaces).

    Attributes:
        modality: t1, t1ce, t2 or flair.
        include: regular expression the text must match (``re.search``).
        exclude: regular expression the text must not match ("" for none).
        contrast: True: the series must be post-contrast; False: must not be; None:
            either.
    """

    modality: str
    include: str
    exclude: str = ""
    contrast: bool | None = None

    def matches(self, text: str, contrast: bool) -> bool:
        """Whether a series with this text and contrast state is this modality."""
        if self.contrast is not None and contrast != self.contrast:
            return False
        if not re.search(self.include, text):
            return False
        return not (self.exclude and re.search(self.exclude, text))


_T1_WORDS = r"\bt1|\bt1w|mprage|mp rage|\bspgr|\bbravo|\btfe\b|\bvibe|\bflash|\bfl3d|\bse t1"
_FLAIR_WORDS = r"flair|dark fluid|\btirm|\bfl2d\b"
_T2_EXCLUDE = r"flair|dark fluid|\btirm|t2\*|t2 ?star|\bswi|\bgre\b|\bhemo|\bdwi|\badc|\btrace"

#: The default rules, tried in order; the first that matches gives the modality.
DEFAULT_RULES: tuple[SeriesRule, ...] = (
    SeriesRule("flair", _FLAIR_WORDS, exclude=r"\bt1"),
    SeriesRule("t1ce", _T1_WORDS, exclude=_FLAIR_WORDS, contrast=True),
    SeriesRule("t1", _T1_WORDS, exclude=_FLAIR_WORDS, contrast=False),
    SeriesRule("t2", r"\bt2", exclude=_T2_EXCLUDE),
)


def parse_series_rules(text: str) -> tuple[SeriesRule, ...]:
    """Site rules from JSON: a list of objects with ``modality``, ``include`` and
    optionally ``exclude`` and ``contrast`` (true, false or null), e.g.
    ``[{"modality": "t1ce", "include": "mprage.*km"}]``. They are tried before
    :data:`DEFAULT_RULES` (the caller adds those).

    Raises:
        ValueError: not such a list, an unknown modality, or a bad regular expression.
    """
    if not text.strip():
        return ()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"series rules are not JSON ({exc.msg})") from None
    if not isinstance(items, list):
        raise ValueError("series rules are a JSON list of objects")
    rules = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"modality", "include", "exclude", "contrast"}:
            raise ValueError(
                f"series rule {n} must be an object with modality, include, exclude, contrast"
            )
        modality, include = item.get("modality"), item.get("include")
        exclude, contrast = item.get("exclude", ""), item.get("contrast")
        if modality not in MODALITIES:
            raise ValueError(f"series rule {n}: modality must be one of {', '.join(MODALITIES)}")
        if not isinstance(include, str) or not include or not isinstance(exclude, str):
            raise ValueError(f"series rule {n}: include (and exclude) must be regular expressions")
        if contrast not in (True, False, None):
            raise ValueError(f"series rule {n}: contrast must be true, false or null")
        for pattern in (include, exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"series rule {n}: bad regular expression ({exc})") from None
        rules.append(SeriesRule(modality, include, exclude, contrast))
    return tuple(rules)


#: Words saying that a series was acquired after (or before) the contrast agent.
_POST_CONTRAST = re.compile(
    r"\bpost|\bgad|\bgd\b|\bgado|contrast|\bce\b|\bt1ce\b|\bt1c\b|\+ ?c\b|\bc\+|\bkm\b|\+km"
)
_PRE_CONTRAST = re.compile(r"\bpre\b|precontrast|\bnative?\b|\bnon ?contrast|\bwithout")


def series_text(ds: Dataset) -> str:
    """SeriesDescription, ProtocolName and SequenceName of a header, normalised for
    :class:`SeriesRule` (lower case, ``_-./`` as spaces)."""
    parts = [str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")]
    parts.append(str(ds.get("SequenceName", "") or ""))
    return re.sub(r"[_\-./]+", " ", " | ".join(parts).lower())


def is_post_contrast(ds: Dataset) -> bool:
    """Whether a series is post-contrast: its text says so ("post", "gad", "+C", ...),
    or, unless the text says "pre"/"native", its ContrastBolusAgent is set."""
    text = re.sub(
        r"[_\-./]+",
        " ",
        " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")).lower(),
    )
    if _PRE_CONTRAST.search(text):
        return False
    return bool(_POST_CONTRAST.search(text) or str(ds.get("ContrastBolusAgent", "") or "").strip())


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def classify_by_sequence(ds: Dataset) -> str | None:
    """The modality a series' sequence attributes suggest, or None.

    FLAIR: inversion recovery with TI >= 1500 ms and TE >= 60 ms; T2: TE >= 60 ms and
    TR >= 1500 ms (no long inversion); T1: TE < 30 ms with TR < 1000 ms or an inversion
    time below 1500 ms (MPRAGE), T1ce when post-contrast (:func:`is_post_contrast`).
    """
    tr, te, ti = _float(ds, "RepetitionTime"), _float(ds, "EchoTime"), _float(ds, "InversionTime")
    if te is None:
        return None
    scanning = {str(v).upper() for v in _values(ds.get("ScanningSequence"))}
    inversion = "IR" in scanning or (ti is not None and ti > 0)
    if inversion and ti is not None and ti >= 1500 and te >= 60:
        return "flair"
    if te >= 60 and tr is not None and tr >= 1500 and not (ti is not None and ti >= 1500):
        return "t2"
    if te < 30 and ((tr is not None and tr < 1000) or (inversion and ti is not None and ti < 1500)):
        return "t1ce" if is_post_contrast(ds) else "t1"
    return None


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [value]


# --------------------------------------------------------------------------- series


@dataclass(frozen=True)
class _Instance:
    """One image: a single-frame DICOM file, or one frame of a multi-frame file.

    Attributes:
        path: the file (or the zip file).
        member: the zip member, or None for a plain file.
        header: the file's header without pixel data; for a frame, the header as that
            frame sees it (:func:`frame_headers`).
        frame: the 1-based frame number in a multi-frame file; 0 for a single-frame one.
        dataset: for a frame, the whole header of its file (functional groups and all).
    """

    path: Path
    member: str | None
    header: Dataset
    frame: int = 0
    dataset: Dataset | None = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        place = f"{self.path}:{self.member}" if self.member else str(self.path)
        return f"{place} (frame {self.frame})" if self.frame else place

    @property
    def source(self) -> Dataset:
        """The header of the file this image is in."""
        return self.dataset if self.dataset is not None else self.header


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study, as found by the scan.

    Attributes:
        uid: SeriesInstanceUID.
        number: SeriesNumber, or None.
        description: SeriesDescription ("" when absent).
        protocol: ProtocolName ("" when absent).
        instances: the files, in the order found.
    """

    uid: str
    number: int | None
    description: str
    protocol: str
    instances: tuple[_Instance, ...] = field(repr=False)

    @property
    def first(self) -> Dataset:
        return self.instances[0].header

    @property
    def image_type(self) -> tuple[str, ...]:
        return tuple(str(v).upper() for v in _values(self.first.get("ImageType")))

    @property
    def derived(self) -> bool:
        return bool(self.image_type) and self.image_type[0] == "DERIVED"

    def label(self) -> str:
        """How messages name the series."""
        number = f"#{self.number} " if self.number is not None else ""
        name = self.description or self.protocol or "no description"
        n = len(self.instances)
        return f"series {number}'{name}' ({n} image{'' if n == 1 else 's'}, UID {self.uid})"


def _unusable(series: SeriesInfo) -> tuple[str, str] | None:
    """``(code, reason)`` when a series cannot be a modality volume, else None."""
    ds = series.first
    sop = str(ds.get("SOPClassUID", ""))
    unread = [i for i in series.instances if not i.frame and _number_of_frames(i.header) > 1]
    if unread:
        return (
            "multiframe",
            f"its multi-frame image {unread[0].where} does not say where each frame lies "
            "(no Per-frame Functional Groups with a Plane Position per frame); export the "
            "series as Enhanced MR or as classic single-frame MR images",
        )
    if sop not in MR_VOLUME_STORAGE:
        name = getattr(pydicom.uid.UID(sop), "name", sop) if sop else "unknown"
        return "unsupported_series", f"it is not an MR image series (SOP class {name})"
    odd = sorted(set(series.image_type) & NOT_A_VOLUME_IMAGE_TYPES)
    if odd:
        image_type = "\\".join(series.image_type)
        return (
            "derived_series",
            f"its images are {'/'.join(odd)} images (ImageType {image_type}), not slices "
            "of an MR volume",
        )
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "unsupported_series", "its images are colour images, not MR intensities"
    return None


def _number_of_frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


#: What a frame's header does not take from its file's top level.
_NOT_PER_FRAME = frozenset(
    pydicom.datadict.tag_for_keyword(k)
    for k in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PixelData")
)


def _lift(frame: Dataset, group: Dataset) -> None:
    """Adds the attributes of a functional groups item (each macro a sequence of one
    item: PlanePositionSequence, PixelMeasuresSequence, ...) to ``frame``, where it has
    none of its own yet."""
    for element in group:
        if element.VR != "SQ" or not element.value:
            continue
        for inner in element.value[0]:
            if inner.tag not in frame:
                frame.add(inner)


def _enhanced_aliases(frame: Dataset) -> None:
    """The classic keywords the checks and the sequence rules read, from their Enhanced
    MR counterparts (EffectiveEchoTime, InversionTimes, PulseSequenceName, ...)."""
    if "EchoTime" not in frame and "EffectiveEchoTime" in frame:
        frame.EchoTime = frame.EffectiveEchoTime
    times = _values(frame.get("InversionTimes"))
    if "InversionTime" not in frame and times:
        frame.InversionTime = times[0]
    if "SequenceName" not in frame and frame.get("PulseSequenceName"):
        frame.SequenceName = frame.PulseSequenceName
    if "ScanningSequence" not in frame and str(frame.get("InversionRecovery", "")) == "YES":
        frame.ScanningSequence = "IR"
    agents = frame.get("ContrastBolusAgentSequence")
    if "ContrastBolusAgent" not in frame and agents:
        frame.ContrastBolusAgent = str(agents[0].get("CodeMeaning", "") or "contrast agent")[:64]


def frame_headers(ds: Dataset) -> list[Dataset] | None:
    """Each frame of a multi-frame image (Enhanced MR, Legacy Converted Enhanced MR) as
    a header of its own, shaped like a classic single-frame image's: the frame's
    per-frame functional groups (PlanePositionSequence, PlaneOrientationSequence,
    PixelMeasuresSequence, PixelValueTransformationSequence, MR echo and timing
    macros, ...), then the shared functional groups, then the file's top-level
    attributes, each taken where the ones before lack it.

    Args:
        ds: the file's header (pixel data not needed).

    Returns:
        One header per frame, in frame order; None when the file has no per-frame
        functional groups for each frame, or one of them no ImagePositionPatient.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != _number_of_frames(ds):
        return None
    shared_groups = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_groups[0] if shared_groups else Dataset()
    top = [element for element in ds if element.tag not in _NOT_PER_FRAME]
    frames = []
    for item in per_frame:
        frame = Dataset()
        _lift(frame, item)
        _lift(frame, shared)
        for element in top:
            if element.tag not in frame:
                frame.add(element)
        _enhanced_aliases(frame)
        if "ImagePositionPatient" not in frame:
            return None
        frames.append(frame)
    return frames


def _instances(file: Path, member: str | None, header: Dataset) -> list[_Instance]:
    """The images of one file: itself, or each of its frames."""
    if _number_of_frames(header) > 1 or "PerFrameFunctionalGroupsSequence" in header:
        frames = frame_headers(header)
        if frames:
            return [_Instance(file, member, f, k, header) for k, f in enumerate(frames, 1)]
    return [_Instance(file, member, header)]


def _scan_sources(path: Path, max_bytes: int) -> Iterator[tuple[Path, str | None, bytes | Path]]:
    """Every candidate file: ``(path, zip member or None, bytes or the file path)``."""
    if path.is_dir():
        total = 0
        for file in sorted(path.rglob("*")):
            rel = file.relative_to(path)
            if not file.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            if file.name.upper() == "DICOMDIR":
                continue
            total += file.stat().st_size
            if total > max_bytes:
                raise _too_large(path, max_bytes)
            yield file, None, file
        return
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InputError(
            "unreadable",
            f"DICOM zip file {path} cannot be read ({err}); send the study again, zipped "
            "with a standard tool",
            path,
        ) from err
    with archive:
        members = [
            info
            for info in archive.infolist()
            if not info.is_dir()
            and not any(p.startswith(".") or p == "__MACOSX" for p in info.filename.split("/"))
            and info.filename.rsplit("/", 1)[-1].upper() != "DICOMDIR"
        ]
        if sum(info.file_size for info in members) > max_bytes:
            raise _too_large(path, max_bytes)
        for info in members:
            try:
                data = archive.read(info)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise InputError(
                    "unreadable",
                    f"member {info.filename} of DICOM zip file {path} cannot be read ({err}); "
                    "the zip looks truncated or corrupt. Send it again",
                    path,
                ) from err
            yield path, info.filename, data


def _too_large(path: Path, max_bytes: int) -> InputError:
    return InputError(
        "too_large",
        f"DICOM study {path} holds more than {max_bytes / 1024**3:.1f} GiB; send only the "
        "series of one study (T1, T1ce, T2 and FLAIR)",
        path,
    )


def scan_study(path: PathLike, *, max_bytes: int = MAX_STUDY_BYTES) -> list[SeriesInfo]:
    """Finds the DICOM series of a study folder (searched recursively) or zip file.

    Files that are not DICOM, hidden files and DICOMDIR are skipped.

    Args:
        path: the folder or ``.zip`` file.
        max_bytes: refuse a study larger than this (a zip: uncompressed).

    Returns:
        The series, ordered by SeriesNumber then UID.

    Raises:
        InputError: ``not_found``, ``unreadable`` (a broken zip), ``too_large``, or
            ``not_dicom`` (no DICOM image file found).
    """
    root = Path(path)
    if not root.exists():
        raise InputError(
            "not_found",
            f"DICOM study {root} does not exist; pass the folder or zip file that holds "
            "the study's series",
            root,
        )
    if not root.is_dir() and not zipfile.is_zipfile(root):
        raise InputError(
            "not_dicom",
            f"{root} is neither a folder nor a zip file; pass the study as a folder of "
            "DICOM files or a zip of one",
            root,
        )
    groups: dict[str, list[_Instance]] = {}
    skipped = 0
    for file, member, content in _scan_sources(root, max_bytes):
        try:
            source = (
                pydicom.filebase.DicomBytesIO(content) if isinstance(content, bytes) else content
            )
            header = pydicom.dcmread(source, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError):
            skipped += 1
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "")
        if not uid or "SOPClassUID" not in header:
            skipped += 1
            continue
        groups.setdefault(uid, []).extend(_instances(file, member, header))
    if not groups:
        raise InputError(
            "not_dicom",
            f"no DICOM image file found in {root} ({skipped} other file"
            f"{'' if skipped == 1 else 's'} skipped); pass a folder or zip of DICOM files",
            root,
        )
    series = []
    for uid, instances in groups.items():
        first = instances[0].header
        number = first.get("SeriesNumber")
        series.append(
            SeriesInfo(
                uid=uid,
                number=None if number in (None, "") else int(number),
                description=str(first.get("SeriesDescription", "") or "").strip(),
                protocol=str(first.get("ProtocolName", "") or "").strip(),
                instances=tuple(instances),
            )
        )
    logger.debug("scanned %s: %d series, %d non-DICOM files", root, len(series), skipped)
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


# --------------------------------------------------------------------------- mapping


def classify_series(
    header: Dataset, rules: Sequence[SeriesRule] = DEFAULT_RULES, use_sequence: bool = True
) -> str | None:
    """The modality ``rules`` (then, with ``use_sequence``, the sequence attributes)
    give a series, from the header of one of its images; None when nothing matches."""
    text = series_text(header)
    contrast = is_post_contrast(header)
    for rule in rules:
        if rule.matches(text, contrast):
            return rule.modality
    return classify_by_sequence(header) if use_sequence else None


def _describe_all(all_series: Sequence[SeriesInfo], notes: Mapping[str, str]) -> str:
    return "; ".join(f"{s.label()} -> {notes.get(s.uid, 'not recognised')}" for s in all_series)


def _find_override(
    all_series: Sequence[SeriesInfo], modality: str, value: str, where: Path
) -> SeriesInfo:
    text = str(value).strip()
    for s in all_series:
        if s.uid == text:
            return s
    numbered = [s for s in all_series if text.isdigit() and s.number == int(text)]
    if len(numbered) == 1:
        return numbered[0]
    listing = "; ".join(s.label() for s in all_series)
    raise InputError(
        "unknown_series",
        f"{modality}={text} names no series of the study "
        f"{'(several share that SeriesNumber) ' if numbered else ''}"
        f"; give a SeriesInstanceUID (or a unique SeriesNumber) of: {listing}",
        where,
    )


def parse_series_overrides(items: Iterable[str]) -> dict[str, str]:
    """``MOD=UID`` items (``t1ce=1.2.840...``, or a SeriesNumber) as overrides of
    :func:`map_series`.

    Raises:
        ValueError: an item that is not ``MOD=UID``, an unknown modality, or one given
            twice.
    """
    overrides: dict[str, str] = {}
    for item in items:
        modality, sep, uid = item.partition("=")
        modality, uid = modality.strip().lower(), uid.strip()
        if not sep or not modality or not uid:
            raise ValueError(f"a series override is MOD=UID (e.g. t1ce=1.2.840...), got {item!r}")
        if modality not in MODALITIES:
            raise ValueError(
                f"unknown modality {modality!r} in series override {item!r}; use "
                f"{', '.join(MODALITIES)}"
            )
        if modality in overrides:
            raise ValueError(f"the series of {modality} is given twice")
        overrides[modality] = uid
    return overrides


def map_series(
    all_series: Sequence[SeriesInfo],
    *,
    rules: Sequence[SeriesRule] = DEFAULT_RULES,
    overrides: Mapping[str, str] | None = None,
    use_sequence: bool = True,
    where: PathLike = "",
) -> dict[str, SeriesInfo]:
    """Picks the series of each modality (see the module docstring, step 2).

    Args:
        all_series: the study's series (:func:`scan_study`).
        rules: the text rules, tried in order.
        overrides: modality -> SeriesInstanceUID (or a unique SeriesNumber); these
            series are used whatever the rules say.
        use_sequence: classify series that no rule matches by their sequence attributes.
        where: the study, for messages.

    Returns:
        Modality -> series, in :data:`~model.nifti_io.MODALITIES` order.

    Raises:
        InputError: ``unknown_modality`` or ``unknown_series`` (a bad override),
            ``ambiguous_series`` (one series given for two modalities, or several
            candidates), ``missing_modality``, or the code of a chosen series that cannot
            be used (``multiframe``, ``derived_series``, ``unsupported_series``).
    """
    place = Path(where)
    chosen = _overridden(all_series, overrides or {}, place)
    notes: dict[str, str] = {s.uid: m for m, s in chosen.items()}
    candidates = _candidates(
        all_series, [m for m in MODALITIES if m not in chosen], notes, rules, use_sequence
    )
    for modality, found in candidates.items():
        if len(found) > 1 and any(not s.derived for s in found):
            found[:] = [s for s in found if not s.derived]
        if len(found) > 1:
            raise InputError(
                "ambiguous_series",
                f"several series of DICOM study {place} look like {modality}: "
                f"{'; '.join(s.label() for s in found)}. Name the one to use, "
                f"{modality}=<SeriesInstanceUID>. All series: {_describe_all(all_series, notes)}",
                place,
            )
    missing = [m for m, found in candidates.items() if not found]
    if missing:
        raise InputError(
            "missing_modality",
            f"DICOM study {place} has no series recognised as {', '.join(missing)}. Series "
            f"found: {_describe_all(all_series, notes)}. Name the series to use, e.g. "
            f"{missing[0]}=<SeriesInstanceUID>",
            place,
        )
    for modality, found in candidates.items():
        chosen[modality] = found[0]
    return {m: chosen[m] for m in MODALITIES}


def _overridden(
    all_series: Sequence[SeriesInfo], overrides: Mapping[str, str], place: Path
) -> dict[str, SeriesInfo]:
    """The series that ``overrides`` name, checked usable and distinct."""
    chosen: dict[str, SeriesInfo] = {}
    for key, value in overrides.items():
        modality = str(key).lower()
        if modality not in MODALITIES:
            raise InputError(
                "unknown_modality",
                f"unknown modality {key!r} in the series mapping; use {', '.join(MODALITIES)}",
                place,
            )
        series = _find_override(all_series, modality, value, place)
        twice = [m for m, s in chosen.items() if s.uid == series.uid]
        if twice:
            raise InputError(
                "ambiguous_series",
                f"{series.label()} is given for both {twice[0]} and {modality}; give each "
                "modality its own series",
                place,
            )
        problem = _unusable(series)
        if problem:
            raise InputError(
                problem[0], f"{series.label()} given for {modality}: {problem[1]}", place
            )
        chosen[modality] = series
    return chosen


def _candidates(
    all_series: Sequence[SeriesInfo],
    modalities: Sequence[str],
    notes: dict[str, str],
    rules: Sequence[SeriesRule],
    use_sequence: bool,
) -> dict[str, list[SeriesInfo]]:
    """The usable series the rules recognise as each of ``modalities``; ``notes`` gets
    how each series was read (for messages)."""
    candidates: dict[str, list[SeriesInfo]] = {m: [] for m in modalities}
    for series in all_series:
        if series.uid in notes:
            continue
        problem = _unusable(series)
        if problem:
            notes[series.uid] = f"skipped: {problem[1]}"
            continue
        guess = classify_series(series.first, rules, use_sequence)
        if guess is None:
            continue
        notes[series.uid] = guess + (" (derived)" if series.derived else "")
        if guess in candidates:
            candidates[guess].append(series)
    return candidates


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class SliceStack:
    """A checked series: its instances in slice order and the grid they form.

    Attributes:
        instances: sorted along the slice normal.
        shape: ``(columns, rows, slices)``.
        affine: the grid's voxel-to-world affine (RAS, mm).
    """

    instances: tuple[_Instance, ...]
    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def reference(self) -> tuple[Dataset, ...]:
        """Per slice, the header of the file it is in (for a frame of a multi-frame
        image, the whole file's header, the same for all its frames)."""
        return tuple(inst.source for inst in self.instances)

    @property
    def frames(self) -> tuple[int, ...]:
        """Per slice, its frame number in a multi-frame file; () for single-frame images."""
        if not any(inst.frame for inst in self.instances):
            return ()
        return tuple(inst.frame for inst in self.instances)


def _vector(ds: Dataset, keyword: str, n: int, series: SeriesInfo, where: Path) -> np.ndarray:
    try:
        values = np.asarray([float(str(v)) for v in _values(ds.get(keyword))], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise InputError(
            "unsupported_series",
            f"{series.label()}: an image has no valid {keyword} ({ds.get(keyword)!r}); "
            "without it the slices cannot be placed in space. Export the series again from "
            "the scanner or PACS",
            where,
        )
    return values


def _one_plane(
    series: SeriesInfo, what: str, place: Path
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The orientation, pixel spacing and (rows, columns) that every image of
    ``series`` must share (``mixed_orientation``, ``inconsistent_slices``)."""
    first = series.first
    orientation = _vector(first, "ImageOrientationPatient", 6, series, place)
    spacing = _vector(first, "PixelSpacing", 2, series, place)
    size = (int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0))
    for inst in series.instances:
        ds = inst.header
        other = _vector(ds, "ImageOrientationPatient", 6, series, place)
        if np.max(np.abs(other - orientation)) > ORIENTATION_TOLERANCE:
            raise InputError(
                "mixed_orientation",
                f"{what} mixes image orientations ({np.round(orientation, 4).tolist()} and "
                f"{np.round(other, 4).tolist()}, file {inst.where}): it holds several stacks "
                "(e.g. a localizer or reformats). Export one orientation per series, or "
                "name another series for it",
                place,
            )
        other_size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        other_spacing = _vector(ds, "PixelSpacing", 2, series, place)
        if other_size != size or np.max(np.abs(other_spacing - spacing)) > 1e-4:
            raise InputError(
                "inconsistent_slices",
                f"{what} mixes image sizes or pixel spacings ({size[0]}x{size[1]} at "
                f"{spacing.tolist()} mm and {other_size[0]}x{other_size[1]} at "
                f"{other_spacing.tolist()} mm, file {inst.where}); a volume needs one grid",
                place,
            )
    return orientation, spacing, size


def _in_plane_axes(
    orientation: np.ndarray, what: str, place: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The unit row and column directions of an ImageOrientationPatient."""
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise InputError(
            "bad_affine",
            f"{what} has ImageOrientationPatient {orientation.tolist()} whose row and column "
            "directions are not perpendicular; the header is broken",
            place,
        )
    return row_dir, col_dir


def _sorted_slices(
    series: SeriesInfo, normal: np.ndarray, what: str, place: Path
) -> tuple[list[_Instance], np.ndarray]:
    """The instances sorted along ``normal`` and their (n, 3) LPS positions; at least
    two, at distinct positions (``not_3d``, ``duplicate_slices``)."""
    positions = {
        id(inst): _vector(inst.header, "ImagePositionPatient", 3, series, place)
        for inst in series.instances
    }
    ordered = sorted(series.instances, key=lambda inst: float(positions[id(inst)] @ normal))
    if len(ordered) < 2:
        raise InputError(
            "not_3d",
            f"{what} has a single slice; each modality must be a 3D volume of at least two slices",
            place,
        )
    p = np.stack([positions[id(inst)] for inst in ordered])
    steps = np.diff(p @ normal)
    if np.min(steps) < 1e-3:
        k = int(np.argmin(steps))
        raise InputError(
            "duplicate_slices",
            f"{what} has several images at one slice position ({ordered[k].where} and "
            f"{ordered[k + 1].where}): it stacks echoes, time points or b-values. Export "
            "one image per slice position, or name another series for it",
            place,
        )
    return ordered, p


def _slice_step(
    p: np.ndarray, normal: np.ndarray, first: Dataset, what: str, place: Path
) -> np.ndarray:
    """The step from one slice to the next: along the normal (``gantry_tilt``) and the
    same everywhere (``uneven_spacing``)."""
    n = len(p)
    step = (p[-1] - p[0]) / (n - 1)
    tilt = float(np.linalg.norm(step - (step @ normal) * normal) / np.linalg.norm(step))
    gantry = _float(first, "GantryDetectorTilt") or 0.0
    if tilt > TILT_TOLERANCE or abs(gantry) > 1e-3:
        degrees = np.degrees(np.arcsin(min(tilt, 1.0))) if tilt > TILT_TOLERANCE else abs(gantry)
        raise InputError(
            "gantry_tilt",
            f"{what} is a tilted (sheared) stack: its slices are offset in-plane along the "
            f"stack by {degrees:.2f} degrees. Its voxels are not on a rectangular grid; "
            "correct the tilt first (e.g. dcm2niix corrects gantry tilt) or name another "
            "series",
            place,
        )
    spacing_z = float(step @ normal)
    expected = p[0] + np.arange(n)[:, None] * step
    deviation = float(np.max(np.linalg.norm(p - expected, axis=1)))
    if deviation > SPACING_RTOL * spacing_z:
        steps = np.diff(p @ normal)
        raise InputError(
            "uneven_spacing",
            f"{what} has unevenly spaced slices (steps from {np.min(steps):.4g} to "
            f"{np.max(steps):.4g} mm, mean {spacing_z:.4g} mm): slices are missing or the "
            "series mixes slabs. Export the complete series",
            place,
        )
    return step


def _transfer_syntax(inst: _Instance) -> str:
    meta = getattr(inst.source, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def _decodable(syntax: str, multiframe: bool) -> bool:
    """Whether pixel data stored in transfer syntax ``syntax`` can be decoded here:
    by SimpleITK (single-frame images) or by pydicom with its installed decoders
    (multi-frame images)."""
    if not syntax:
        return True  # no file meta: read as implicit little endian, as pydicom does
    if not multiframe:
        return syntax in SINGLE_FRAME_SYNTAXES
    try:
        return bool(pydicom.pixels.get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def _check_decodable(series: SeriesInfo, what: str, place: Path) -> None:
    """Every image's transfer syntax can be decoded (``unsupported_series``)."""
    for inst in series.instances:
        syntax = _transfer_syntax(inst)
        if not _decodable(syntax, bool(inst.frame)):
            name = getattr(pydicom.uid.UID(syntax), "name", syntax)
            raise InputError(
                "unsupported_series",
                f"{what}: the pixel data of {inst.where} are stored as {name} ({syntax}), "
                "which cannot be decoded here. Send the series uncompressed (Explicit VR "
                "Little Endian) or JPEG-LS, JPEG 2000 or RLE lossless",
                place,
            )


def slice_stack(series: SeriesInfo, modality: str, where: PathLike = "") -> SliceStack:
    """Checks a series' geometry and sorts its slices (module docstring, step 3).

    Raises:
        InputError: ``mixed_orientation``, ``inconsistent_slices``,
            ``duplicate_slices``, ``gantry_tilt``, ``uneven_spacing``, ``not_3d``,
            ``bad_voxel_size`` or ``unsupported_series`` (no geometry, or pixel data in
            a transfer syntax that cannot be decoded).
    """
    place = Path(where)
    what = f"{modality} {series.label()}"
    _check_decodable(series, what, place)
    orientation, spacing, size = _one_plane(series, what, place)
    row_dir, col_dir = _in_plane_axes(orientation, what, place)
    normal = np.cross(row_dir, col_dir)
    ordered, p = _sorted_slices(series, normal, what, place)
    step = _slice_step(p, normal, series.first, what, place)
    sizes = [float(spacing[1]), float(spacing[0]), float(step @ normal)]
    if any(not MIN_VOXEL_MM <= s <= MAX_VOXEL_MM for s in sizes):
        raise InputError(
            "bad_voxel_size",
            f"{what} has voxel sizes {sizes} mm; each must lie in [{MIN_VOXEL_MM}, "
            f"{MAX_VOXEL_MM}] mm",
            place,
        )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: the column index, x
    lps[:3, 1] = col_dir * spacing[0]  # down a column: the row index, y
    lps[:3, 2] = step
    lps[:3, 3] = p[0]
    return SliceStack(tuple(ordered), (size[1], size[0], len(ordered)), _RAS_TO_LPS @ lps)


# --------------------------------------------------------------------------- pixels


def _read_volume(stack: SliceStack, what: str, where: Path) -> np.ndarray:
    """The stack's voxels ``(columns, rows, slices)`` as float32 (rescale slope and
    intercept applied): single-frame images decoded by SimpleITK, frames of multi-frame
    images by pydicom."""
    if any(inst.frame for inst in stack.instances):
        return _read_frames(stack, what, where)
    import SimpleITK as sitk  # noqa: N813 (the library's own abbreviation)

    with tempfile.TemporaryDirectory(prefix="omnet-dicom-") as tmp:
        files = []
        archives: dict[Path, zipfile.ZipFile] = {}
        try:
            for k, inst in enumerate(stack.instances):
                if inst.member is None:
                    files.append(str(inst.path))
                    continue
                if inst.path not in archives:
                    archives[inst.path] = zipfile.ZipFile(inst.path)
                target = Path(tmp) / f"{k:05d}.dcm"  # our own name, never the member's
                target.write_bytes(archives[inst.path].read(inst.member))
                files.append(str(target))
        finally:
            for archive in archives.values():
                archive.close()
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise InputError(
                "unreadable",
                f"the pixel data of {what} cannot be decoded "
                f"({str(err).strip().splitlines()[-1]}); "
                "export it uncompressed or with a standard transfer syntax",
                where,
            ) from err
    volume = sitk.GetArrayFromImage(image)  # (slices, rows, columns)
    expected = stack.shape[::-1]
    if volume.shape != expected:
        raise InputError(
            "inconsistent_slices",
            f"{what} decodes to shape {volume.shape[::-1]}, its headers say {stack.shape}",
            where,
        )
    return np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32)


def _read_frames(stack: SliceStack, what: str, where: Path) -> np.ndarray:
    """The voxels of a stack of frames of multi-frame images, decoded by pydicom, each
    frame rescaled by its own slope and intercept (PixelValueTransformationSequence)."""
    volume = np.empty(stack.shape, dtype=np.float32)
    files: dict[tuple[Path, str | None], list[tuple[int, _Instance]]] = {}
    for z, inst in enumerate(stack.instances):
        files.setdefault((inst.path, inst.member), []).append((z, inst))
    for (path, member), frames in files.items():
        try:
            if member is None:
                ds = pydicom.dcmread(path)
            else:
                with zipfile.ZipFile(path) as archive:
                    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(archive.read(member)))
            pixels = np.asarray(pydicom.pixels.pixel_array(ds))
        except Exception as err:  # any decoder's failure: the file's data are unusable
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else "no reason given"
            raise InputError(
                "unreadable",
                f"the pixel data of {what} cannot be decoded ({frames[0][1].where}: "
                f"{reason}); export it uncompressed or with a standard transfer syntax",
                where,
            ) from err
        pixels = pixels.reshape(-1, *pixels.shape[-2:])  # (frames, rows, columns)
        for z, inst in frames:
            if inst.frame > pixels.shape[0] or pixels.shape[1:] != stack.shape[1::-1]:
                raise InputError(
                    "inconsistent_slices",
                    f"{what}: {inst.where} decodes to {pixels.shape[0]} frames of "
                    f"{pixels.shape[1]}x{pixels.shape[2]}, its headers say otherwise",
                    where,
                )
            slope = _float(inst.header, "RescaleSlope")
            intercept = _float(inst.header, "RescaleIntercept")
            frame = pixels[inst.frame - 1].astype(np.float64)
            frame = frame * (1.0 if slope is None else slope) + (intercept or 0.0)
            volume[:, :, z] = frame.T
    return volume


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


# --------------------------------------------------------------------------- the study


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
        volume = _read_volume(stack, what, root)
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


def looks_like_dicom(path: PathLike, *, max_files: int = 200) -> bool:
    """Whether ``path`` is a zip file, or a folder holding a DICOM file (the ``DICM``
    marker, or a ``.dcm`` name) among its first ``max_files`` files (searched
    recursively)."""
    p = Path(path)
    if p.is_file():
        return zipfile.is_zipfile(p)
    if not p.is_dir():
        return False
    for n, file in enumerate(f for f in p.rglob("*") if f.is_file()):
        if n >= max_files:
            break
        if file.suffix.lower() == ".dcm":
            return True
        try:
            with open(file, "rb") as f:
                f.seek(128)
                if f.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False
