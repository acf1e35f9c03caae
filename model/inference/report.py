"""The report of one segmented case: one typed shape, written by the command line
(``<case>_metrics.json``) and served by the API (a job's ``metrics``).

:class:`CaseReport` is what :func:`model.inference.case.process_case` returns;
:meth:`CaseReport.to_dict` gives the JSON document, typed by :class:`CaseReportDict`
(the API builds its OpenAPI schema from these classes, so the document and its schema
are defined once). ``report_version`` changes when a key is removed or changes meaning;
new keys may be added within a version. :func:`upgrade_report` reads the documents of
results stored before the version field existed.

Paths are rendered by the caller (``paths``): the command line writes them as given,
the service writes file names only, because its storage paths mean nothing to a caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from typing_extensions import TypedDict

from model.defaults import DEFAULT_FUSION, LEGACY_FUSION, tta_mode

if TYPE_CHECKING:  # the API reads this module's types without loading the metrics' imports
    from model.evaluation.metrics import RegionMetrics

#: Version of the report's JSON shape.
REPORT_VERSION = 1


class RegionScores(TypedDict):
    """One region's metrics against the reference (``None`` where undefined)."""

    dice: float
    sensitivity: float
    specificity: float | None
    ppv: float | None
    hd95: float
    volume_pred_ml: float
    volume_ref_ml: float


class EvaluationDict(TypedDict):
    """Scores against a reference label map: the reference's file, metrics per region."""

    reference: str | None
    metrics: dict[str, RegionScores]


class CheckpointRef(TypedDict):
    """One checkpoint of the model: file name, SHA-256, network variant and width."""

    name: str
    sha256: str
    variant: str
    width: int


class InferenceDict(TypedDict):
    """How the result was made: the model (``name`` and ``sha256`` of the checkpoint, or
    of the ensemble joined by ``+``), tiling, mirrored test-time augmentation (``tta``:
    whether any; ``tta_mode``: ``off``, ``mirror`` or ``all``), device,
    the network's arithmetic (``float32``, ``bfloat16`` or ``float16``), tiles per batch,
    post-processing mode and fusion rule (:data:`model.defaults.FusionRule`)."""

    model_name: str
    model_sha256: str
    checkpoints: list[CheckpointRef]
    tiling: str
    tta: bool
    tta_mode: str
    device: str
    precision: str
    batch_size: int
    postprocess: str
    fusion: str


class QualityDict(TypedDict):
    """Signs of a likely failure (:class:`model.inference.lesions.Quality`): whether a
    person should review the result, the stable flag names that tripped, the measures
    behind them and one sentence per flag."""

    review_recommended: bool
    flags: list[str]
    measures: dict[str, float]
    notes: list[str]


class DicomSeriesRef(TypedDict):
    """A DICOM series used as a modality."""

    uid: str
    number: int | None
    description: str


class DicomSummaryDict(TypedDict):
    """For DICOM input: the series used per modality, those resampled onto the T1ce
    grid, and the warnings reading the study gave."""

    series: dict[str, DicomSeriesRef]
    resampled: list[str]
    warnings: list[str]


class CaseReportDict(TypedDict):
    """The report of one segmented case (``report_version`` 1).

    ``inputs`` and ``outputs`` map a modality or an output kind (``segmentation``,
    ``probabilities``, ``preview``, ``dicom_seg``, ``dicom_preview``) to its file;
    ``volumes_ml`` holds the WT, TC and ET volumes of the result; ``label_convention``
    is the label the enhancing tumour was written with (4, BraTS 2018; or 3);
    ``warnings`` is what a person should know about the input or the result;
    ``evaluation`` is null without a reference; ``dicom`` is null for NIfTI input;
    ``timings_s`` gives seconds per stage.
    """

    report_version: int
    case: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    shape: list[int]
    spacing_mm: list[float]
    label_convention: Literal[4, 3]
    volumes_ml: dict[str, float]
    tiles: int
    inference: InferenceDict | None
    quality: QualityDict | None
    warnings: list[str]
    dicom: DicomSummaryDict | None
    evaluation: EvaluationDict | None
    timings_s: dict[str, float]


@dataclass(frozen=True)
class InferenceInfo:
    """How a predictor makes its results (the report's ``inference`` block)."""

    model_name: str
    model_sha256: str
    checkpoints: tuple[CheckpointRef, ...]
    tiling: str
    tta_mode: str
    device: str
    precision: str
    batch_size: int
    postprocess: str
    fusion: str = DEFAULT_FUSION

    @classmethod
    def describe(
        cls,
        model: Mapping[str, Any],
        *,
        tiling: str,
        tta: bool | str,
        device: str,
        precision: str,
        batch_size: int,
        postprocess: str,
        fusion: str = DEFAULT_FUSION,
    ) -> InferenceInfo:
        """From :func:`model.net.checkpoint.describe_checkpoints`'s account of the model
        and the predictor's settings (``tta`` as :class:`~model.inference.tiling.Predictor`
        takes it)."""
        checkpoints = tuple(
            CheckpointRef(
                name=c["name"], sha256=c["sha256"], variant=c["variant"], width=c["width"]
            )
            for c in model["checkpoints"]
        )
        name, sha256 = model["name"], model["sha256"]
        return cls(
            name,
            sha256,
            checkpoints,
            tiling,
            tta_mode(tta),
            device,
            precision,
            batch_size,
            postprocess,
            fusion,
        )

    def to_dict(self) -> InferenceDict:
        return InferenceDict(
            model_name=self.model_name,
            model_sha256=self.model_sha256,
            checkpoints=[CheckpointRef(**c) for c in self.checkpoints],
            tiling=self.tiling,
            tta=self.tta_mode != "off",
            tta_mode=self.tta_mode,
            device=self.device,
            precision=self.precision,
            batch_size=self.batch_size,
            postprocess=self.postprocess,
            fusion=self.fusion,
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
        outputs: kind (``segmentation``, ``probabilities``, ``preview``, ``dicom_seg``,
            ``dicom_preview``) -> file written.
        warnings: what the user should know about the input and the result.
        quality: signs of a likely failure (:meth:`model.inference.lesions.Quality.to_dict`).
        inference: how the result was made, when the caller said.
        dicom: for DICOM input, :meth:`model.io.dicom.study.DicomStudy.summary`.
        failures: output kind -> why that output could not be written (a DICOM output
            that failed after the label map was written); each is also a warning.
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
    inference: InferenceInfo | None = None
    dicom: dict[str, Any] | None = None
    failures: dict[str, str] = field(default_factory=dict)

    def to_dict(self, paths: Callable[[str | Path], str] = str) -> CaseReportDict:
        """The JSON document; ``paths`` renders each file (default: as given)."""
        et_label: Literal[4, 3] = 3 if self.et_label == 3 else 4
        return CaseReportDict(
            report_version=REPORT_VERSION,
            case=self.case,
            inputs={m: paths(p) for m, p in self.inputs.items()},
            outputs={kind: paths(p) for kind, p in self.outputs.items()},
            shape=list(self.shape),
            spacing_mm=list(self.spacing_mm),
            label_convention=et_label,
            volumes_ml=dict(self.volumes_ml),
            tiles=self.tiles,
            inference=None if self.inference is None else self.inference.to_dict(),
            quality=cast(QualityDict, dict(self.quality)) if self.quality else None,
            warnings=list(self.warnings),
            dicom=None if self.dicom is None else cast(DicomSummaryDict, dict(self.dicom)),
            evaluation=None
            if self.evaluation is None
            else EvaluationDict(
                reference=None if self.reference is None else paths(self.reference),
                metrics={
                    region: RegionScores(**m.to_dict())  # type: ignore[typeddict-item]
                    for region, m in self.evaluation.items()
                },
            ),
            timings_s={k: round(v, 3) for k, v in self.timings_s.items()},
        )


def upgrade_report(document: Mapping[str, Any]) -> dict[str, Any]:
    """A stored report in the current shape.

    Results stored before ``report_version`` existed hold the service's earlier
    document (``label_convention``, ``reference`` as region -> metrics, the study's
    warnings only under ``dicom``); keys it lacks are null or empty.
    """
    if document.get("report_version") == REPORT_VERSION:
        upgraded = dict(document)
        inference = upgraded.get("inference")
        if inference is not None and "precision" not in inference:
            # Stored before the key existed: the predictor autocast on CUDA only.
            cuda = str(inference.get("device", "")).startswith("cuda")
            inference = {**inference, "precision": "float16" if cuda else "float32"}
        if inference is not None and "fusion" not in inference:
            # Stored before the fusion rule was recorded: the arg-max was the only one.
            inference = {**inference, "fusion": LEGACY_FUSION}
        if inference is not None and "tta_mode" not in inference:
            # Stored before the modes: test-time augmentation was all eight or none.
            inference = {**inference, "tta_mode": "all" if inference.get("tta") else "off"}
        upgraded["inference"] = inference
        return upgraded
    dicom = document.get("dicom")
    warnings = list((dicom or {}).get("warnings", [])) + list(document.get("warnings", []))
    reference = document.get("reference")
    return {
        "report_version": REPORT_VERSION,
        "case": document.get("case", ""),
        "inputs": dict(document.get("inputs", {})),
        "outputs": dict(document.get("outputs", {})),
        "shape": list(document.get("shape", [])),
        "spacing_mm": list(document.get("spacing_mm", [])),
        "label_convention": document.get("label_convention", document.get("et_label", 4)),
        "volumes_ml": dict(document.get("volumes_ml", {})),
        "tiles": int(document.get("tiles", 0)),
        "inference": None,
        "quality": document.get("quality") or None,
        "warnings": list(dict.fromkeys(warnings)),
        "dicom": dicom,
        "evaluation": None if reference is None else {"reference": None, "metrics": reference},
        "timings_s": dict(document.get("timings_s", {})),
    }
