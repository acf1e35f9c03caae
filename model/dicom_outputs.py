"""DICOM outputs of a segmented study: a Segmentation (SEG) and a preview (Secondary Capture).

:func:`write_dicom_seg` writes the label map of a case read with
:func:`model.dicom_study.read_dicom_study` as a DICOM Segmentation (highdicom) on the
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
tumour". Display colours are those of the PNG previews (:mod:`model.preview`).

:func:`read_dicom_seg` reconstructs the label map from a SEG on its source grid (the
inverse of :func:`write_dicom_seg`), and :func:`write_preview_dicom` stores the overlay
preview of :func:`model.preview.render_preview` as an RGB Secondary Capture image in
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
from model.labels import EDEMA, ENHANCING, NCR_NET, LabelError, to_brats2018
from model.nifti_io import MODALITIES
from model.preview import LABEL_COLOURS, render_preview

if TYPE_CHECKING:
    from model.dicom_study import DicomStudy

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: SeriesNumber of the SEG and of the preview, and their descriptions.
SEG_SERIES_NUMBER = 900
PREVIEW_SERIES_NUMBER = 901
SEG_SERIES_DESCRIPTION = "omnet tumour segmentation"
PREVIEW_SERIES_DESCRIPTION = "omnet tumour segmentation preview"

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
        model_sha256: their SHA-256 (see :func:`model.checkpoint.describe_checkpoints`).
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


def _check_reference(reference: Sequence[Dataset]) -> tuple[int, int, int]:
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


def write_dicom_seg(
    labels: np.ndarray,
    reference: Sequence[Dataset],
    path: PathLike,
    *,
    algorithm: AlgorithmInfo | None = None,
    series_number: int = SEG_SERIES_NUMBER,
    manufacturer: str = "omnet",
) -> Path:
    """Writes a BraTS label map as a DICOM Segmentation of its source series.

    Args:
        labels: uint8 ``(X, Y, Z)`` in the BraTS 2018 convention (0, 1, 2, 4), on the
            source series' grid: x the column index, y the row index, z the slices in
            ``reference`` order (what :func:`model.dicom_study.read_dicom_study` gives).
        reference: the source series' instances (headers suffice) in slice order,
            :attr:`model.dicom_study.DicomStudy.reference`.
        path: the ``.dcm`` file to write (atomically; folders created).
        algorithm: the algorithm's identification (default: omnet, this version).
        series_number: the SEG's SeriesNumber.
        manufacturer: Manufacturer of the SEG.

    Returns:
        The path written.

    Raises:
        ValueError: labels not on the reference grid or not BraTS labels.
    """
    grid = _check_reference(reference)
    checked = _checked_labels(labels, grid)
    algorithm = algorithm or AlgorithmInfo()
    numbers = np.zeros(checked.shape, dtype=np.uint8)
    for segment in SEGMENTS:
        numbers[checked == segment.label] = segment.number
    frames = np.ascontiguousarray(numbers.transpose(2, 1, 0))  # (slices, rows, columns)
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
    seg = hd.seg.Segmentation(
        source_images=list(reference),
        pixel_array=frames,
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
        omit_empty_frames=bool(np.any(frames)),  # an empty SEG still needs one frame
    )
    target = atomic_write(Path(path), lambda tmp: seg.save_as(tmp))
    logger.debug("wrote SEG %s (%d frames)", target, int(seg.NumberOfFrames))
    return target


def read_dicom_seg(path: PathLike, reference: Sequence[Dataset]) -> np.ndarray:
    """The label map a SEG written by :func:`write_dicom_seg` holds, on its source grid.

    Args:
        path: the SEG file.
        reference: the source series' instances in slice order.

    Returns:
        uint8 ``(X, Y, Z)`` in the BraTS 2018 convention.

    Raises:
        ValueError: the SEG's segments are not those of :data:`SEGMENTS`.
    """
    grid = _check_reference(reference)
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
    numbers = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in reference],
        combine_segments=True,
    )  # (slices, rows, columns) of segment numbers
    labels = np.zeros(grid, dtype=np.uint8)
    volume = np.asarray(numbers).transpose(2, 1, 0)
    for number, label in mapping.items():
        labels[volume == number] = label
    return labels


def write_preview_dicom(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    reference: Dataset,
    path: PathLike,
    *,
    series_number: int = PREVIEW_SERIES_NUMBER,
    manufacturer: str = "omnet",
    size: int = 256,
) -> Path:
    """Writes the overlay preview (:func:`model.preview.render_preview`) as an RGB
    Secondary Capture image in the study of ``reference``.

    Args:
        image: the 3D volume shown in grey (e.g. the case's FLAIR).
        labels: the label map on the same grid.
        affine: the grid's affine.
        reference: an instance of the source study (patient and study are copied).
        path: the ``.dcm`` file to write (atomically).
        series_number: the image's SeriesNumber.
        manufacturer: Manufacturer.
        size: height in pixels of each panel.

    Returns:
        The path written.
    """
    rgb = np.asarray(render_preview(image, labels, affine, size=size).convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    # Three panels of different planes: no single orientation describes the image
    # (Patient Orientation is type 2C for a Secondary Capture: present, may be empty).
    sc["PatientOrientation"].value = ""
    sc.BodyPartExamined = str(reference.get("BodyPartExamined", "") or "BRAIN")
    sc.SeriesDescription = PREVIEW_SERIES_DESCRIPTION
    sc.BurnedInAnnotation = "NO"  # captions and legend only, no patient identifiers
    return atomic_write(Path(path), lambda tmp: sc.save_as(tmp))


def write_study_outputs(
    study: DicomStudy,
    labels: np.ndarray,
    seg_path: PathLike,
    preview_path: PathLike | None = None,
    *,
    algorithm: AlgorithmInfo | None = None,
) -> dict[str, Path]:
    """The DICOM results of a case read from DICOM: the SEG of its T1ce series and,
    with ``preview_path``, the overlay preview on the FLAIR as a Secondary Capture.

    Args:
        study: the study the case was read from (:func:`model.dicom_study.read_dicom_study`).
        labels: the label map on the case's (the T1ce's) grid, any ET convention.
        seg_path: the SEG file to write.
        preview_path: the Secondary Capture file to write, or None.
        algorithm: the algorithm's identification.

    Returns:
        ``dicom_seg`` (and ``dicom_preview``) -> the file written.
    """
    case = study.case
    written = {"dicom_seg": write_dicom_seg(labels, study.reference, seg_path, algorithm=algorithm)}
    if preview_path is not None:
        flair = case.images[MODALITIES.index("flair")]
        written["dicom_preview"] = write_preview_dicom(
            flair, labels, case.affine, study.reference[0], preview_path
        )
    return written
