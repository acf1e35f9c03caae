"""A DICOM conformance corpus, written at test time from a volume (a cropped BraTS case).

:func:`write_corpus` writes the case as a plain study
(:func:`model.io.dicom.write_series.write_study`, four classic MR series) and then one
study per :data:`VARIANTS` entry: the same images as other writers and anonymisers send
them. Each variant says what reading it must give:
``None`` - the plain study's voxels (and so its labels); otherwise the
:class:`~model.io.volumes.InputError` code of the refusal and words its message must hold.

The transcodings are pydicom's own encoders (RLE), pyjpegls (JPEG-LS), pylibjpeg-openjpeg
(JPEG 2000) and pydicom's writer (deflated, big-endian, implicit VR); the multi-frame
series are highdicom's Legacy Converted Enhanced MR (:class:`hd.legacy.
LegacyConvertedEnhancedMRImage`) and an Enhanced MR Image Storage object made from it
the way scanners write them (MR timing, echo and modifier macros, per-frame rescale, frames
out of slice order).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from model.io.dicom.protocols import StudyInfo
from model.io.dicom.scan import ENHANCED_MR_STORAGE
from model.io.dicom.write_series import write_study

#: Type 2 attributes that writers and anonymisers leave out or empty.
TYPE2 = (
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)

#: Series descriptions and protocol names in other languages (the T1ce told by its
#: contrast agent and sequence, the others by their sequence attributes or "FLAIR").
FOREIGN = {
    "t1": ("T1強調画像 横断", "T1 ソース"),
    "t1ce": ("T1強調 造影後", "T1 造影"),
    "t2": ("Т2-взвешенное аксиальное", "Т2 акс"),
    "flair": ("FLAIR aksiaalinen – äöå", "FLAIR äöå"),
}
#: The patient's name in the study with foreign descriptions.
FOREIGN_PATIENT = "Иванов^Иван"


@dataclass(frozen=True)
class Variant:
    """One study of the corpus.

    Attributes:
        name: the variant (also its folder name).
        folder: the study folder.
        code: None: reads to the plain study's voxels; else the refusal's code.
        words: text the refusal's message must hold.
        seg_refused: the study reads, but its SEG cannot be made (refused before
            inference when a SEG is asked for).
    """

    name: str
    folder: Path
    code: str | None = None
    words: tuple[str, ...] = ()
    seg_refused: bool = False


def crop_case(images: np.ndarray, affine: np.ndarray, labels: np.ndarray, size: tuple[int, ...]):
    """``(images, affine, labels)`` cropped to ``size`` around the tumour's centre."""
    found = np.argwhere(labels > 0)
    centre = (
        (found.min(axis=0) + found.max(axis=0)) // 2 if found.size else np.array(labels.shape) // 2
    )
    shape = np.array(labels.shape)
    low = np.clip(centre - np.array(size) // 2, 0, shape - np.array(size))
    box = tuple(slice(int(a), int(a + s)) for a, s in zip(low, size, strict=True))
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    return (
        np.ascontiguousarray(images[(slice(None), *box)]),
        cropped_affine,
        np.ascontiguousarray(labels[box]),
    )


# --------------------------------------------------------------------------- per file


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm"))


def _each_file(folder: Path, edit: Callable[[Dataset, Path], None]) -> None:
    for path in _files(folder):
        ds = pydicom.dcmread(path)
        edit(ds, path)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)  # in the file meta's syntax


def _type2_absent(ds: Dataset, _path: Path) -> None:
    for keyword in TYPE2:
        if keyword in ds:
            delattr(ds, keyword)


def _type2_empty(ds: Dataset, _path: Path) -> None:
    for keyword in TYPE2:
        setattr(ds, keyword, "")


def _private_tags(ds: Dataset, _path: Path) -> None:
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    block.add_new(0x08, "CS", "IMAGE NUM 4")
    block.add_new(0x10, "OB", bytes(range(256)) * 4)
    item = Dataset()
    item.add_new(0x00091001, "LO", "nested private text")
    philips = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    philips.add_new(0x0D, "DS", "0.0")
    philips.add_new(0x0E, "SQ", [item])


def _transcode(syntax: str) -> Callable[[Dataset, Path], None]:
    def edit(ds: Dataset, _path: Path) -> None:
        if syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
            ds.compress(syntax)
            return
        if syntax == ExplicitVRBigEndian:
            pixels = ds.pixel_array
            ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = syntax

    return edit


def _foreign(ds: Dataset, path: Path) -> None:
    modality = path.parent.name.split("_", 1)[1]
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription, ds.ProtocolName = FOREIGN[modality]
    ds.StudyDescription = "МРТ головного мозга с контрастом"
    ds.PatientName = FOREIGN_PATIENT


def _no_descriptions(ds: Dataset, _path: Path) -> None:
    ds.SeriesDescription = ""
    del ds.ProtocolName


def _no_frame_of_reference(ds: Dataset, _path: Path) -> None:
    del ds.FrameOfReferenceUID
    del ds.PositionReferenceIndicator


def _undecodable(ds: Dataset, path: Path) -> None:
    if path.parent.name.endswith("_t1ce"):  # HTJ2K, which SimpleITK (GDCM) cannot decode
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
        ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])


# --------------------------------------------------------------------------- per series


def _series_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _legacy(files: list[Path]) -> Dataset:
    sources = [pydicom.dcmread(p) for p in reversed(files)]
    first = sources[0]
    return hd.legacy.LegacyConvertedEnhancedMRImage(
        sources,
        series_instance_uid=first.SeriesInstanceUID,
        series_number=int(first.SeriesNumber),
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )


def _save_multiframe(ds: Dataset, folder: Path) -> None:
    for path in _files(folder):
        path.unlink()
    ds.save_as(folder / "MF0001.dcm", enforce_file_format=True)


def _to_legacy(folder: Path) -> None:
    for series in _series_folders(folder):
        _save_multiframe(_legacy(_files(series)), series)


def _enhanced(legacy: Dataset, seed: int) -> Dataset:
    """An Enhanced MR Image Storage object from a Legacy Converted one: acquisition
    attributes in the MR functional group macros, a rescale intercept of its own per
    frame, and the frames in shuffled order."""
    ds = legacy
    ds.SOPClassUID = ENHANCED_MR_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    shared = ds.SharedFunctionalGroupsSequence[0]
    converted = shared.UnassignedSharedConvertedAttributesSequence[0]
    timing, echo, modifier = Dataset(), Dataset(), Dataset()
    timing.RepetitionTime = converted.RepetitionTime
    timing.FlipAngle = converted.FlipAngle
    timing.EchoTrainLength = converted.EchoTrainLength
    echo.EffectiveEchoTime = converted.EchoTime
    inversion = converted.get("InversionTime")
    modifier.InversionRecovery = "YES" if inversion else "NO"
    if inversion:
        modifier.InversionTimes = [inversion]
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MREchoSequence = [echo]
    shared.MRModifierSequence = [modifier]
    ds.PulseSequenceName = converted.SequenceName
    del shared.UnassignedSharedConvertedAttributesSequence
    if "PixelValueTransformationSequence" in shared:
        del shared.PixelValueTransformationSequence
    pixels = ds.pixel_array.astype(np.int64)  # (frames, rows, columns)
    frames = list(ds.PerFrameFunctionalGroupsSequence)
    order = random.Random(seed).sample(range(len(frames)), len(frames))
    stored = np.empty(pixels.shape, dtype=np.uint16)
    for new, old in enumerate(order):
        item = frames[old]
        for keyword in ("UnassignedPerFrameConvertedAttributesSequence",):
            if keyword in item:
                delattr(item, keyword)
        rescale = Dataset()
        rescale.RescaleIntercept = str(-10 * new)
        rescale.RescaleSlope = "1"
        rescale.RescaleType = "US"
        item.PixelValueTransformationSequence = [rescale]
        stored[new] = pixels[old] + 10 * new
    ds.PerFrameFunctionalGroupsSequence = [frames[old] for old in order]
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    return ds


def _to_enhanced(folder: Path) -> None:
    for n, series in enumerate(_series_folders(folder)):
        _save_multiframe(_enhanced(_legacy(_files(series)), seed=n), series)


def _frames_without_positions(folder: Path) -> None:
    """The T2 as one classic-looking multi-frame file with no functional groups."""
    series = next(p for p in _series_folders(folder) if p.name.endswith("_t2"))
    files = _files(series)
    sources = [pydicom.dcmread(p) for p in files]
    ds = sources[0]
    ds.NumberOfFrames = len(sources)
    ds.PixelData = b"".join(s.PixelData for s in sources)
    _save_multiframe(ds, series)


def _random_order(folder: Path) -> None:
    """Every file in one flat folder under a random name, in random order."""
    files = _files(folder)
    rng = random.Random(7)
    rng.shuffle(files)
    for path in files:
        path.rename(folder / f"{rng.getrandbits(64):016x}")
    for series in _series_folders(folder):
        shutil.rmtree(series)


def _meta(ds: Dataset, sop_class: str) -> None:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _study_part(ds: Dataset, like: Dataset, modality: str, number: int, description: str) -> None:
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, like.get(keyword, ""))
    for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, like.get(keyword, ""))
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.Manufacturer = "omnet test"


def _extra_instances(folder: Path) -> None:
    """A three-plane localizer series, a Basic Text SR and a Grayscale Softcopy
    Presentation State, beside the four series."""
    t1 = next(p for p in _series_folders(folder) if p.name.endswith("_t1"))
    like = pydicom.dcmread(_files(t1)[0])
    extra = folder / "extra"
    extra.mkdir()
    localizer_uid = generate_uid()
    planes = ([1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1])
    for k, orientation in enumerate(planes):
        ds = pydicom.dcmread(_files(t1)[k])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = localizer_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = ds.ProtocolName = "localizer"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = orientation
        ds.InstanceNumber = k + 1
        ds.save_as(extra / f"LOC{k + 1}.dcm", enforce_file_format=True)
    sr = Dataset()
    _meta(sr, "1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    _study_part(sr, like, "SR", 98, "radiology report")
    sr.ValueType, sr.ContinuityOfContent = "CONTAINER", "SEPARATE"
    sr.CompletionFlag, sr.VerificationFlag = "COMPLETE", "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "18748-4", "LN"
    concept.CodeMeaning = "Diagnostic imaging report"
    sr.ConceptNameCodeSequence = [concept]
    sr.save_as(extra / "SR0001.dcm", enforce_file_format=True)
    pr = Dataset()
    _meta(pr, "1.2.840.10008.5.1.4.1.1.11.1")  # Grayscale Softcopy Presentation State
    _study_part(pr, like, "PR", 99, "key images")
    pr.ContentLabel, pr.ContentDescription = "KEY", "window for the tumour"
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = like.SOPClassUID
    referenced.ReferencedSOPInstanceUID = like.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = like.SeriesInstanceUID
    series.ReferencedImageSequence = [referenced]
    pr.ReferencedSeriesSequence = [series]
    pr.save_as(extra / "PR0001.dcm", enforce_file_format=True)


# --------------------------------------------------------------------------- the corpus

_FILE_EDITS: dict[str, Callable[[Dataset, Path], None]] = {
    "type2_absent": _type2_absent,
    "type2_empty": _type2_empty,
    "private_tags": _private_tags,
    "jpeg_ls": _transcode(JPEGLSLossless),
    "jpeg2000": _transcode(JPEG2000Lossless),
    "rle": _transcode(RLELossless),
    "deflated": _transcode(DeflatedExplicitVRLittleEndian),
    "big_endian": _transcode(ExplicitVRBigEndian),
    "implicit_vr": _transcode(ImplicitVRLittleEndian),
    "foreign_descriptions": _foreign,
    "no_descriptions": _no_descriptions,
    "no_frame_of_reference": _no_frame_of_reference,
    "undecodable": _undecodable,
}
_STUDY_EDITS: dict[str, Callable[[Path], None]] = {
    "legacy_enhanced": _to_legacy,
    "enhanced_mr": _to_enhanced,
    "frames_without_positions": _frames_without_positions,
    "random_order": _random_order,
    "extra_instances": _extra_instances,
}

#: Every variant: None, or (refusal code, words of its message).
VARIANTS: dict[str, tuple[str, tuple[str, ...]] | None] = {
    "plain": None,
    **{name: None for name in _FILE_EDITS},
    **{name: None for name in _STUDY_EDITS},
    "undecodable": ("unsupported_series", ("t1ce", "High-Throughput JPEG 2000", "Send the series")),
    "frames_without_positions": (
        "missing_modality",
        ("t2", "does not say where each frame lies", "export the series"),
    ),
}
#: Variants that read, but whose SEG cannot be made (refused before inference).
SEG_REFUSED = frozenset({"no_frame_of_reference"})


#: The crop of the real case: small enough for fast inference, JPEG 2000's six
#: resolution levels need at least 32 pixels a side.
CROP = (48, 48, 24)


@dataclass(frozen=True)
class Corpus:
    """The corpus of a real case: its variants and the case's reference labels on the crop."""

    variants: dict[str, Variant]
    labels: np.ndarray


def build_corpus(case_dir: Path, root: Path) -> Corpus:
    """The corpus of the BraTS case in ``case_dir``, cropped to :data:`CROP`."""
    from model.io.nifti.files import find_label_file
    from model.io.nifti.read import load_case, load_labels

    case = load_case(case_dir)
    labels = load_labels(find_label_file(case_dir), like=case)
    images, affine, cropped = crop_case(case.images, case.affine, labels, CROP)
    return Corpus(write_corpus(images, affine, root), cropped)


def write_corpus(
    images: np.ndarray, affine: np.ndarray, root: Path, names: list[str] | None = None
) -> dict[str, Variant]:
    """Writes the plain study and each variant (default: all of :data:`VARIANTS`) into
    ``root/<variant>``; returns them by name."""
    plain = root / "plain"
    write_study(
        images, affine, plain, study=StudyInfo(patient_id="P-CORPUS", accession_number="A1")
    )
    out = {}
    for name in names or list(VARIANTS):
        folder = root / name
        if name != "plain":
            shutil.copytree(plain, folder)
            if name in _FILE_EDITS:
                _each_file(folder, _FILE_EDITS[name])
            else:
                _STUDY_EDITS[name](folder)
        refusal = VARIANTS[name]
        code, words = refusal if refusal is not None else (None, ())
        out[name] = Variant(name, folder, code, words, name in SEG_REFUSED)
    return out
