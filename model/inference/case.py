"""One case, start to end: load, segment, score against a reference, write, report.

:func:`process_case` is the one path that the command line (``omnet segment``), the
service's workers and the benchmarks take through a case, NIfTI or DICOM: it writes
every output (label map, probabilities, PNG preview and, for a DICOM study, the DICOM
SEG and the preview as a Secondary Capture) and returns the
:class:`~model.inference.report.CaseReport`. Each caller adds only what is its own
(a progress bar and the summary line; job heartbeats, cancellation and storage; a
results table).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.evaluation.metrics import evaluate_case, region_volumes_ml
from model.inference.pipeline import SegmentationOptions, segment_case, write_segmentation
from model.inference.report import CaseReport, InferenceInfo
from model.inference.tiling import Predictor, ProgressCallback
from model.io.nifti.read import load_case, load_labels
from model.io.volumes import Case
from model.labels import ENHANCING

if TYPE_CHECKING:
    from model.io.dicom.study import DicomStudy

#: What :func:`model.io.nifti.read.load_case` reads: a case folder, a 4-D file, or the four
#: modality files by name.
CaseSource = str | Path | Mapping[str, str | Path]


@dataclass(frozen=True)
class CaseOutputs:
    """Where a case's files go; a None path skips that file.

    Attributes:
        segmentation: the label map (always written).
        probabilities: the fused class probabilities (also needs
            ``SegmentationOptions.probabilities``).
        preview: a PNG overlay of the labels on the FLAIR.
    """

    segmentation: Path
    probabilities: Path | None = None
    preview: Path | None = None
    dicom_seg: Path | None = None
    dicom_preview: Path | None = None

    @classmethod
    def in_folder(
        cls,
        folder: Path,
        name: str,
        probabilities: bool = False,
        preview: bool = False,
        dicom: bool = False,
    ) -> CaseOutputs:
        """The command line's names: ``<folder>/<name>_seg.nii.gz`` and siblings
        (``dicom``: also ``<name>_seg.dcm`` and, with ``preview``, ``<name>_preview.dcm``)."""
        return cls(
            folder / f"{name}_seg.nii.gz",
            folder / f"{name}_probabilities.nii.gz" if probabilities else None,
            folder / f"{name}_preview.png" if preview else None,
            folder / f"{name}_seg.dcm" if dicom else None,
            folder / f"{name}_preview.dcm" if dicom and preview else None,
        )


def process_case(
    source: CaseSource | Case | DicomStudy,
    predictor: Predictor,
    outputs: CaseOutputs,
    options: SegmentationOptions | None = None,
    *,
    name: str | None = None,
    reference: str | Path | None = None,
    et_label: int = ENHANCING,
    progress: ProgressCallback | None = None,
    check: Callable[[], None] | None = None,
    inference: InferenceInfo | None = None,
    read_s: float = 0.0,
) -> CaseReport:
    """Loads, segments, evaluates and writes one case.

    The label map, probabilities and preview are written first; the DICOM outputs of a
    study come after them, and one that cannot be written is recorded in the report
    (``failures`` and a warning) instead of raising: the label map and the metrics are
    the result, and they are kept.

    Args:
        source: what :func:`~model.io.nifti.read.load_case` reads, a loaded case, or a
            DICOM study read with :func:`~model.io.dicom.study.read_dicom_study`.
        predictor: the network(s) and tiling.
        outputs: where the files go.
        options: post-processing and extra outputs.
        name: the case name (default: derived from the files).
        reference: a reference label map to score against; it is read before the
            inference, so that a bad one fails early.
        et_label: label of the enhancing tumour in the written file (4 or 3).
        progress: called with (tiles done, tiles in all) during inference.
        check: called between stages and with every progress report; raise from it
            to stop (e.g. a cancelled job).
        inference: how the predictor makes its results, for the report (and the
            algorithm named in a DICOM SEG).
        read_s: seconds the caller spent reading a loaded case or study (``source``),
            counted in the report's ``load`` and ``total``.

    Raises:
        InputError: the case or the reference cannot be used.
    """
    started = time.perf_counter() - read_s
    study = _as_study(source)
    case = _case_of(source, study, name)
    ref_labels = load_labels(reference, like=case) if reference is not None else None
    timings = {"load": time.perf_counter() - started}
    _check(check)

    tiles = 0

    def on_progress(done: int, total: int) -> None:
        nonlocal tiles
        tiles = total
        if progress is not None:
            progress(done, total)
        _check(check)

    seg = segment_case(case, predictor, options, on_progress)
    timings.update(seg.timings)
    _check(check)

    evaluation = None
    if ref_labels is not None:
        tick = time.perf_counter()
        evaluation = evaluate_case(seg.labels, ref_labels, case.spacing, ENHANCING, ENHANCING)
        timings["evaluate"] = time.perf_counter() - tick

    tick = time.perf_counter()
    written = write_segmentation(
        seg, case, outputs.segmentation, outputs.probabilities, outputs.preview, et_label
    )
    timings["write"] = time.perf_counter() - tick
    failures: dict[str, str] = {}
    if study is not None and outputs.dicom_seg is not None:
        _check(check)
        tick = time.perf_counter()
        failures = _write_dicom(study, seg.labels, outputs, inference, written)
        timings["write_dicom"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    warnings = [*(study.warnings if study is not None else []), *seg.warnings]
    warnings += [f"{failure}; the label map and metrics are kept" for failure in failures.values()]
    return CaseReport(
        case=case.name,
        inputs={m: str(p) for m, p in case.sources.items()},
        shape=case.shape,
        spacing_mm=case.spacing,
        et_label=et_label,
        volumes_ml=region_volumes_ml(seg.labels, case.spacing, ENHANCING),
        evaluation=evaluation,
        reference=None if reference is None else str(reference),
        tiles=tiles,
        timings_s=timings,
        outputs=written,
        warnings=list(dict.fromkeys(warnings)),
        quality=seg.quality.to_dict(),
        inference=inference,
        dicom=None if study is None else study.summary(),
        failures=failures,
    )


def _case_of(
    source: CaseSource | Case | DicomStudy, study: DicomStudy | None, name: str | None
) -> Case:
    if study is not None:
        return study.case
    if isinstance(source, Case):
        return source
    return load_case(source, name=name)  # type: ignore[arg-type]


def _as_study(source: object) -> DicomStudy | None:
    """``source`` if it is a DICOM study. A NIfTI case never loads the DICOM modules
    (pydicom, highdicom: 0.2 s of start-up): a study exists only where they are loaded."""
    module = sys.modules.get("model.io.dicom.study")
    return source if module is not None and isinstance(source, module.DicomStudy) else None


def _write_dicom(
    study: DicomStudy,
    labels: np.ndarray,
    outputs: CaseOutputs,
    inference: InferenceInfo | None,
    written: dict[str, Path],
) -> dict[str, str]:
    """Writes the SEG (and, with a preview path, the Secondary Capture) of a study,
    adding the files to ``written``; returns, for each that could not be written, a
    sentence saying why."""
    from model.io.dicom.outputs import write_study_outputs
    from model.io.dicom.seg import AlgorithmInfo, software_version

    assert outputs.dicom_seg is not None
    algorithm = (
        None
        if inference is None
        else AlgorithmInfo(
            version=software_version(),
            model_name=inference.model_name,
            model_sha256=inference.model_sha256,
        )
    )
    result = write_study_outputs(
        study, labels, outputs.dicom_seg, outputs.dicom_preview, algorithm=algorithm
    )
    written.update(result.written)
    return result.failures


def _check(check: Callable[[], None] | None) -> None:
    if check is not None:
        check()
