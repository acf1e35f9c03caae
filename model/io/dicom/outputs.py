"""Every DICOM output of a segmented study at once: the SEG and the preview Secondary
Capture (:func:`write_study_outputs`), and a check before inference that they can be
built from the source headers (:func:`dicom_output_problems`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from model.atomic import atomic_write
from model.io.dicom.seg import (
    SEG_SERIES_NUMBER,
    AlgorithmInfo,
    build_segmentation,
    check_reference,
    complete_type2,
    write_dicom_seg,
)
from model.io.preview import render_preview
from model.io.volumes import MODALITIES
from model.labels import EDEMA

if TYPE_CHECKING:
    from model.io.dicom.study import DicomStudy

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


PREVIEW_SERIES_NUMBER = 901


PREVIEW_SERIES_DESCRIPTION = "omnet tumour segmentation preview"


def _secondary_capture(
    rgb: np.ndarray, reference: Dataset, series_number: int, manufacturer: str
) -> hd.sc.SCImage:
    """An RGB Secondary Capture image in the study of ``reference`` (not yet written)."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=complete_type2(reference),
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
    return sc


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
    """Writes the overlay preview (:func:`model.io.preview.render_preview`) as an RGB
    Secondary Capture image in the study of ``reference``.

    The patient and study attributes are copied from ``reference``; type 2 ones it
    lacks (:data:`COPIED_TYPE2`) are written empty.

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
    sc = _secondary_capture(rgb, reference, series_number, manufacturer)
    return atomic_write(Path(path), lambda tmp: sc.save_as(tmp))


def _reason(exc: Exception) -> str:
    """An exception's message as one line a user can read."""
    text = str(exc).strip()
    if not text:
        return "no reason given"
    missing = re.search(r"has no attribute '(\w+)'", text)
    if missing:
        return f"the source images have no {missing.group(1)}"
    return text.splitlines()[0]


def dicom_output_problems(
    reference: Sequence[Dataset], frames: Sequence[int] = (), *, preview: bool = True
) -> list[str]:
    """What would keep the SEG (and, with ``preview``, the Secondary Capture) of a
    source series from being made: both are built, in memory, for a label map of one
    voxel. Cheap (well under a second for a 155-slice series), so it runs before a
    job is queued or inference starts, not after.

    Args:
        reference: the source series' headers in slice order.
        frames: for a multi-frame source, the frame number of each slice in it.
        preview: also try the Secondary Capture.

    Returns:
        One sentence per output that cannot be made; empty when both can.
    """
    problems = []
    try:
        grid = check_reference(reference)
        labels = np.zeros(grid, dtype=np.uint8)
        labels[0, 0, 0] = EDEMA
        build_segmentation(labels, reference, frames, AlgorithmInfo(), SEG_SERIES_NUMBER, "omnet")
    except Exception as exc:  # whatever highdicom refuses, said in words
        problems.append(f"the DICOM SEG cannot be written ({_reason(exc)})")
    if preview and reference:
        try:
            rgb = np.zeros((8, 8, 3), dtype=np.uint8)
            _secondary_capture(rgb, reference[0], PREVIEW_SERIES_NUMBER, "omnet")
        except Exception as exc:
            problems.append(f"the DICOM preview cannot be written ({_reason(exc)})")
    return problems


@dataclass(frozen=True)
class StudyOutputs:
    """What :func:`write_study_outputs` wrote, and what it could not.

    Attributes:
        written: ``dicom_seg`` (and ``dicom_preview``) -> the file written.
        failures: output kind -> one sentence saying what failed; the other outputs
            (and the label map they were made from) are unaffected.
    """

    written: dict[str, Path]
    failures: dict[str, str]


def write_study_outputs(
    study: DicomStudy,
    labels: np.ndarray,
    seg_path: PathLike,
    preview_path: PathLike | None = None,
    *,
    algorithm: AlgorithmInfo | None = None,
) -> StudyOutputs:
    """The DICOM results of a case read from DICOM: the SEG of its T1ce series and,
    with ``preview_path``, the overlay preview on the FLAIR as a Secondary Capture.

    Each is written on its own: one that fails (a source header highdicom refuses, a
    full disk) is reported in :attr:`StudyOutputs.failures` (the traceback logged at
    debug level; the caller says what failed), and the other is still written.

    Args:
        study: the study the case was read from (:func:`model.io.dicom.study.read_dicom_study`).
        labels: the label map on the case's (the T1ce's) grid, any ET convention.
        seg_path: the SEG file to write.
        preview_path: the Secondary Capture file to write, or None.
        algorithm: the algorithm's identification.

    Returns:
        The files written and the outputs that failed.
    """
    case = study.case
    written: dict[str, Path] = {}
    failures: dict[str, str] = {}
    try:
        written["dicom_seg"] = write_dicom_seg(
            labels, study.reference, seg_path, frames=study.frames, algorithm=algorithm
        )
    except Exception as exc:  # the label map is kept whatever the SEG writer says
        failures["dicom_seg"] = f"the DICOM SEG could not be written ({_reason(exc)})"
        logger.debug("%s: %s", case.name, failures["dicom_seg"], exc_info=True)
    if preview_path is not None:
        try:
            flair = case.images[MODALITIES.index("flair")]
            written["dicom_preview"] = write_preview_dicom(
                flair, labels, case.affine, study.reference[0], preview_path
            )
        except Exception as exc:
            failures["dicom_preview"] = (
                f"the DICOM preview (Secondary Capture) could not be written ({_reason(exc)})"
            )
            logger.debug("%s: %s", case.name, failures["dicom_preview"], exc_info=True)
    return StudyOutputs(written, failures)
