"""DICOM outputs of a segmented study: a Segmentation (SEG) and a preview (Secondary Capture).

:func:`write_dicom_seg` writes the label map of a case read with
:func:`model.io.dicom.study.read_dicom_study` as a DICOM Segmentation (highdicom) on the
T1ce series' geometry: one frame per T1ce slice that holds tumour, each frame
referencing its source image (DerivationImageSequence / SourceImageSequence, which
OHIF and other viewers use to place it), the series referenced in
ReferencedSeriesSequence, the study, patient and FrameOfReferenceUID copied from it,
BINARY segmentation type, and one segment per tumour region (:data:`SEGMENTS`), each
marked AUTOMATIC with the algorithm identified (:class:`AlgorithmInfo`: name "omnet",
the software version, the model's name and SHA-256 as parameters).

Coded concepts (SNOMED CT, scheme SCT), from DICOM CID 7150 (category) and CID 7151
(property types), where the standard's lists have them:

=====================  ==========  =====================================  ==========
segment                 BraTS label  property type                          category
=====================  ==========  =====================================  ==========
1 NCR/NET               1            6574001 "Necrosis"                     49755003
2 Edema                 2            79654002 "Edema"                       49755003
3 Enhancing tumour      4            108369006 "Neoplasm"                   49755003
=====================  ==========  =====================================  ==========

49755003 is "Morphologically Abnormal Structure"; every segment carries the anatomic
region 12738006 "Brain". BraTS's label 1 (necrotic and non-enhancing tumour core) has
no single code: "Necrosis" is used, and the segment label and description say
"NCR/NET". Neither has enhancing tumour: "Neoplasm" is used with the label "Enhancing
tumour". Display colours are those of the PNG previews (:mod:`model.io.preview`).

:func:`read_dicom_seg` reconstructs the label map from a SEG on its source grid (the
inverse of :func:`write_dicom_seg`), and :func:`write_preview_dicom` stores the overlay
preview of :func:`model.io.preview.render_preview` as an RGB Secondary Capture image in
the same study.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from model.atomic import atomic_write
from model.io.preview import LABEL_COLOURS
from model.labels import EDEMA, ENHANCING, NCR_NET, LabelError, to_brats2018

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


#: SeriesNumber of the SEG and of the preview, and their descriptions.
SEG_SERIES_NUMBER = 900


SEG_SERIES_DESCRIPTION = "omnet tumour segmentation"


#: Segmented property category of every segment: Morphologically Abnormal Structure.
CATEGORY = Code("49755003", "SCT", "Morphologically Abnormal Structure")


#: Anatomic region of every segment.
BRAIN = Code("12738006", "SCT", "Brain")


@dataclass(frozen=True)
class Segment:
    """One segment of the SEG.

    Attributes:
        number: SegmentNumber (1, 2, 3).
        label: the BraTS 2018 label it holds.
        name: SegmentLabel.
        description: SegmentDescription.
        property_type: SegmentedPropertyTypeCodeSequence.
    """

    number: int
    label: int
    name: str
    description: str
    property_type: Code


#: The segments, in SegmentNumber order.
SEGMENTS: tuple[Segment, ...] = (
    Segment(
        1,
        NCR_NET,
        "NCR/NET",
        "necrotic and non-enhancing tumour core (BraTS label 1)",
        Code("6574001", "SCT", "Necrosis"),
    ),
    Segment(
        2, EDEMA, "Edema", "peritumoral edema (BraTS label 2)", Code("79654002", "SCT", "Edema")
    ),
    Segment(
        3,
        ENHANCING,
        "Enhancing tumour",
        "enhancing tumour (BraTS label 4)",
        Code("108369006", "SCT", "Neoplasm"),
    ),
)


def software_version() -> str:
    """The installed omnet package's version ("unknown" when not installed)."""
    try:
        return importlib.metadata.version("omnet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class AlgorithmInfo:
    """What made the segmentation, as the SEG's AlgorithmIdentificationSequence says.

    Attributes:
        name: AlgorithmName.
        version: AlgorithmVersion (the software's version).
        model_name: the checkpoint(s) used.
        model_sha256: their SHA-256 (see :func:`model.net.checkpoint.describe_checkpoints`).
    """

    name: str = "omnet"
    version: str = ""
    model_name: str = ""
    model_sha256: str = ""

    def sequence(self) -> hd.AlgorithmIdentificationSequence:
        parameters = {
            k: v for k, v in (("model", self.model_name), ("model_sha256", self.model_sha256)) if v
        }
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"),
            version=self.version or software_version(),
            parameters=parameters or None,
        )


#: Type 2 attributes of the Patient and General Study modules that the SEG and the
#: Secondary Capture copy from their source: each output has them all, empty where the
#: source lacks them (type 2: present, may be empty), so that a source from a writer or
#: anonymiser that leaves them out still gives valid outputs.
COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def complete_type2(ds: Dataset) -> Dataset:
    """``ds``, or a copy of it (the caller's left untouched) with the attributes of
    :data:`COPIED_TYPE2` that it lacks added empty."""
    missing = [k for k in COPIED_TYPE2 if k not in ds]
    if not missing:
        return ds
    copy = Dataset()
    for element in ds:
        copy.add(element)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        copy.file_meta = meta
    for keyword in missing:
        setattr(copy, keyword, "")
    return copy


def _completed(reference: Sequence[Dataset]) -> list[Dataset]:
    """:func:`complete_type2` of each header, each distinct header completed once."""
    done: dict[int, Dataset] = {}
    return [done.setdefault(id(ds), complete_type2(ds)) for ds in reference]


def check_reference(reference: Sequence[Dataset]) -> tuple[int, int, int]:
    """The grid ``(columns, rows, slices)`` of the source series."""
    if len(reference) == 0:
        raise ValueError("reference must hold the source series' instances, got none")
    first = reference[0]
    return int(first.Columns), int(first.Rows), len(reference)


def _checked_labels(labels: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != grid:
        raise ValueError(
            f"labels must be on the source series' grid (columns, rows, slices) {grid}, "
            f"got shape {arr.shape}"
        )
    try:
        return to_brats2018(arr, et_label=ENHANCING)
    except LabelError as err:
        raise ValueError(f"labels: {err}") from err


def _source_frames(
    numbers: np.ndarray, reference: Sequence[Dataset], frames: Sequence[int]
) -> tuple[list[Dataset], np.ndarray]:
    """The SEG's source images and its frames ``(frames, rows, columns)``, in the order
    highdicom pairs them: one frame per source image, or, for a multi-frame source, one
    per frame of it (slice z is its frame ``frames[z]``)."""
    sources = _completed(reference)
    planes = numbers.transpose(2, 1, 0)  # (slices, rows, columns)
    if not frames:
        return sources, np.ascontiguousarray(planes)
    if len(frames) != len(reference):
        raise ValueError(
            f"frames must give the frame number of each of the {len(reference)} slices, "
            f"got {len(frames)}"
        )
    unique = list({id(ds): ds for ds in sources}.values())
    if len(unique) != 1:
        raise ValueError(
            f"the T1ce series is split over {len(unique)} multi-frame images; a SEG can "
            "reference one. Export the series as one Enhanced MR image or as classic "
            "single-frame images"
        )
    count = int(unique[0].get("NumberOfFrames", 1) or 1)
    if max(frames) > count or min(frames) < 1:
        raise ValueError(f"frame numbers must lie in 1..{count}, got {min(frames)}..{max(frames)}")
    out = np.zeros((count, *planes.shape[1:]), dtype=planes.dtype)
    out[np.asarray(frames) - 1] = planes
    return unique, out


def build_segmentation(
    checked: np.ndarray,
    reference: Sequence[Dataset],
    frames: Sequence[int],
    algorithm: AlgorithmInfo,
    series_number: int,
    manufacturer: str,
) -> hd.seg.Segmentation:
    """The SEG of a checked BraTS label map (not yet written)."""
    numbers = np.zeros(checked.shape, dtype=np.uint8)
    for segment in SEGMENTS:
        numbers[checked == segment.label] = segment.number
    sources, pixels = _source_frames(numbers, reference, frames)
    identification = algorithm.sequence()
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s.number,
            segment_label=s.name,
            segmented_property_category=CATEGORY,
            segmented_property_type=s.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            anatomic_regions=[BRAIN],
            display_color=hd.color.CIELabColor.from_rgb(*LABEL_COLOURS[s.label]),
        )
        for s in SEGMENTS
    ]
    for description, s in zip(descriptions, SEGMENTS, strict=True):
        description.SegmentDescription = s.description
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version or software_version(),
        device_serial_number="none",
        content_label="TUMOUR",
        content_description="Brain tumour regions (BraTS): NCR/NET, edema, enhancing tumour",
        content_creator_name=f"{algorithm.name}^",
        series_description=SEG_SERIES_DESCRIPTION,
        omit_empty_frames=bool(np.any(pixels)),  # an empty SEG still needs one frame
    )


def write_dicom_seg(
    labels: np.ndarray,
    reference: Sequence[Dataset],
    path: PathLike,
    *,
    frames: Sequence[int] = (),
    algorithm: AlgorithmInfo | None = None,
    series_number: int = SEG_SERIES_NUMBER,
    manufacturer: str = "omnet",
) -> Path:
    """Writes a BraTS label map as a DICOM Segmentation of its source series.

    The patient and study attributes are copied from the source; type 2 ones it lacks
    (:data:`COPIED_TYPE2`) are written empty.

    Args:
        labels: uint8 ``(X, Y, Z)`` in the BraTS 2018 convention (0, 1, 2, 4), on the
            source series' grid: x the column index, y the row index, z the slices in
            ``reference`` order (what :func:`model.io.dicom.study.read_dicom_study` gives).
        reference: the source series' instances (headers suffice) in slice order,
            :attr:`model.io.dicom.study.DicomStudy.reference`.
        path: the ``.dcm`` file to write (atomically; folders created).
        frames: for a multi-frame source, the frame number of each slice in it
            (:attr:`model.io.dicom.study.DicomStudy.frames`); () for single-frame images.
        algorithm: the algorithm's identification (default: omnet, this version).
        series_number: the SEG's SeriesNumber.
        manufacturer: Manufacturer of the SEG.

    Returns:
        The path written.

    Raises:
        ValueError: labels not on the reference grid or not BraTS labels, or a source
            that a SEG cannot reference.
    """
    grid = check_reference(reference)
    checked = _checked_labels(labels, grid)
    seg = build_segmentation(
        checked, reference, frames, algorithm or AlgorithmInfo(), series_number, manufacturer
    )
    target = atomic_write(Path(path), lambda tmp: seg.save_as(tmp))
    logger.debug("wrote SEG %s (%d frames)", target, int(seg.NumberOfFrames))
    return target


def read_dicom_seg(
    path: PathLike, reference: Sequence[Dataset], frames: Sequence[int] = ()
) -> np.ndarray:
    """The label map a SEG written by :func:`write_dicom_seg` holds, on its source grid.

    Args:
        path: the SEG file.
        reference: the source series' instances in slice order.
        frames: for a multi-frame source, the frame number of each slice in it.

    Returns:
        uint8 ``(X, Y, Z)`` in the BraTS 2018 convention.

    Raises:
        ValueError: the SEG's segments are not those of :data:`SEGMENTS`.
    """
    grid = check_reference(reference)
    seg = hd.seg.segread(str(path))
    by_code = {(s.property_type.value, s.property_type.scheme_designator): s for s in SEGMENTS}
    mapping: dict[int, int] = {}
    for item in seg.SegmentSequence:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        segment = by_code.get((str(code.CodeValue), str(code.CodingSchemeDesignator)))
        if segment is None:
            raise ValueError(
                f"SEG segment {item.SegmentNumber} ({item.SegmentLabel}) has property type "
                f"{code.CodeValue} {code.CodeMeaning}, not one of omnet's segments"
            )
        mapping[int(item.SegmentNumber)] = segment.label
    if frames:
        numbers = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=str(reference[0].SOPInstanceUID),
            source_frame_numbers=list(frames),
            combine_segments=True,
            assert_missing_frames_are_empty=True,  # empty frames are left out of the SEG
        )
    else:
        numbers = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in reference],
            combine_segments=True,
        )  # (slices, rows, columns) of segment numbers
    labels = np.zeros(grid, dtype=np.uint8)
    volume = np.asarray(numbers).transpose(2, 1, 0)
    for number, label in mapping.items():
        labels[volume == number] = label
    return labels
