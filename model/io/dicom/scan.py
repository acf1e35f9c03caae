"""Scanning a DICOM folder or zip file into series, headers only (step 1 of
:mod:`model.io.dicom.study`).

Multi-frame images (Enhanced MR, Legacy Converted Enhanced MR) count as one image per
frame, each with the header that frame sees (:func:`frame_headers`).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MRImageStorage

from model.io.volumes import InputError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


#: Enhanced MR Image Storage and Legacy Converted Enhanced MR Image Storage: multi-frame
#: series, read frame by frame like classic ones (:func:`frame_headers`).
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


LEGACY_CONVERTED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"


#: The SOP classes a modality series may have.
MR_VOLUME_STORAGE = frozenset(
    {str(MRImageStorage), ENHANCED_MR_STORAGE, LEGACY_CONVERTED_MR_STORAGE}
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


#: Default limit on the bytes a study (a folder, or a zip uncompressed) may hold.
MAX_STUDY_BYTES = 8 * 1024**3


def multi_values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)  # type: ignore[call-overload]
    except TypeError:
        return [value]


@dataclass(frozen=True)
class Instance:
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
    instances: tuple[Instance, ...] = field(repr=False)

    @property
    def first(self) -> Dataset:
        return self.instances[0].header

    @property
    def image_type(self) -> tuple[str, ...]:
        return tuple(str(v).upper() for v in multi_values(self.first.get("ImageType")))

    @property
    def derived(self) -> bool:
        return bool(self.image_type) and self.image_type[0] == "DERIVED"

    def label(self) -> str:
        """How messages name the series."""
        number = f"#{self.number} " if self.number is not None else ""
        name = self.description or self.protocol or "no description"
        n = len(self.instances)
        return f"series {number}'{name}' ({n} image{'' if n == 1 else 's'}, UID {self.uid})"


def unusable_reason(series: SeriesInfo) -> tuple[str, str] | None:
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
    times = multi_values(frame.get("InversionTimes"))
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


def _instances(file: Path, member: str | None, header: Dataset) -> list[Instance]:
    """The images of one file: itself, or each of its frames."""
    if _number_of_frames(header) > 1 or "PerFrameFunctionalGroupsSequence" in header:
        frames = frame_headers(header)
        if frames:
            return [Instance(file, member, f, k, header) for k, f in enumerate(frames, 1)]
    return [Instance(file, member, header)]


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
    groups: dict[str, list[Instance]] = {}
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
