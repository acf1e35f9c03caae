"""One case, start to end: load, segment, score against a reference, write, report.

:func:`process_case` is the one path that the command line (``omnet segment``), the
service's workers and the benchmarks take through a case; each adds only what is its
own (a progress bar, job heartbeats and cancellation, a results table).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.evaluation.metrics import RegionMetrics, evaluate_case, region_volumes_ml
from model.inference.pipeline import SegmentationOptions, segment_case, write_segmentation
from model.inference.tiling import Predictor, ProgressCallback
from model.io.nifti.read import load_case, load_labels
from model.io.volumes import Case
from model.labels import ENHANCING

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

    @classmethod
    def in_folder(
        cls, folder: Path, name: str, probabilities: bool = False, preview: bool = False
    ) -> CaseOutputs:
        """The command line's names: ``<folder>/<name>_seg.nii.gz`` and siblings."""
        return cls(
            folder / f"{name}_seg.nii.gz",
            folder / f"{name}_probabilities.nii.gz" if probabilities else None,
            folder / f"{name}_preview.png" if preview else None,
        )


@dataclass
class CaseReport:
    """What processing one case gave.

    Attributes:
        case: the case name.
        inputs: modality -> file read.
        shape: the case's grid, in voxels.
        spacing_mm: voxel size per axis.
        et_label: the label the enhancing tumour was written with (4 or 3).
        volumes_ml: WT, TC and ET volumes of the result.
        evaluation: region -> metrics against the reference, or None without one.
        reference: the reference file, or None.
        tiles: tiles the network ran on.
        timings_s: seconds per stage (load, pre-processing, inference, ..., total).
        outputs: kind (``segmentation``, ``probabilities``, ``preview``) -> file written.
        warnings: what the user should know about the result.
        quality: signs of a likely failure (:meth:`model.inference.lesions.Quality.to_dict`).
    """

    case: str
    inputs: dict[str, str]
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    et_label: int
    volumes_ml: dict[str, float]
    evaluation: dict[str, RegionMetrics] | None = None
    reference: str | None = None
    tiles: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (paths as strings, metrics as plain dicts)."""
        return {
            "case": self.case,
            "inputs": dict(self.inputs),
            "outputs": {kind: str(p) for kind, p in self.outputs.items()},
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "et_label": self.et_label,
            "volumes_ml": dict(self.volumes_ml),
            "tiles": self.tiles,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "warnings": list(self.warnings),
            "quality": dict(self.quality),
            "evaluation": None
            if self.evaluation is None
            else {
                "reference": self.reference,
                "metrics": {region: m.to_dict() for region, m in self.evaluation.items()},
            },
        }


def process_case(
    source: CaseSource | Case,
    predictor: Predictor,
    outputs: CaseOutputs,
    options: SegmentationOptions | None = None,
    *,
    name: str | None = None,
    reference: str | Path | None = None,
    et_label: int = ENHANCING,
    progress: ProgressCallback | None = None,
    check: Callable[[], None] | None = None,
) -> CaseReport:
    """Loads, segments, evaluates and writes one case.

    Args:
        source: what :func:`~model.io.nifti.read.load_case` reads, or a loaded case.
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

    Raises:
        InputError: the case or the reference cannot be used.
    """
    started = time.perf_counter()
    case = source if isinstance(source, Case) else load_case(source, name=name)
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
    timings["total"] = time.perf_counter() - started
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
        warnings=list(seg.warnings),
        quality=seg.quality.to_dict(),
    )


def _check(check: Callable[[], None] | None) -> None:
    if check is not None:
        check()
