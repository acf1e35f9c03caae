"""model/inference/report.py: one typed report shape, its schema, and stored documents
from before the version field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from model.evaluation.metrics import RegionMetrics
from model.inference.report import (
    REPORT_VERSION,
    CaseReport,
    CaseReportDict,
    InferenceInfo,
    upgrade_report,
)

SCORES = RegionMetrics(0.9, 0.8, 0.99, None, 3.5, 10.0, 11.0)
MODEL = {
    "name": "omnet_cga.pt",
    "sha256": "ab" * 32,
    "checkpoints": [
        {"name": "omnet_cga.pt", "sha256": "ab" * 32, "variant": "omnet_cga", "width": 8}
    ],
}


def _report(**changes) -> CaseReport:
    fields = dict(
        case="c1",
        inputs={"t1": "/data/c1/c1_t1.nii.gz"},
        shape=(4, 5, 6),
        spacing_mm=(1.0, 1.0, 1.0),
        et_label=4,
        volumes_ml={"WT": 1.0, "TC": 0.5, "ET": 0.25},
        evaluation={"WT": SCORES, "TC": SCORES, "ET": SCORES},
        reference="/data/c1/c1_seg.nii.gz",
        tiles=3,
        timings_s={"total": 1.23456},
        outputs={"segmentation": Path("/out/c1_seg.nii.gz")},
        warnings=["w"],
        quality={"review_recommended": False, "flags": [], "measures": {"rim": 0.0}, "notes": []},
        inference=InferenceInfo.describe(
            MODEL,
            tiling="wide",
            tta=False,
            device="cpu",
            precision="float32",
            batch_size=16,
            postprocess="main-lesion",
        ),
    )
    fields.update(changes)
    return CaseReport(**fields)


def test_the_document_has_exactly_the_typed_keys_and_validates():
    document = _report().to_dict()
    assert set(document) == set(CaseReportDict.__annotations__)
    assert document["report_version"] == REPORT_VERSION
    TypeAdapter(CaseReportDict).validate_python(json.loads(json.dumps(document)))
    assert document["timings_s"] == {"total": 1.235}
    assert document["inference"]["checkpoints"][0]["width"] == 8


def test_without_a_reference_or_dicom_the_keys_stay_and_are_null():
    document = _report(evaluation=None, reference=None, quality={}, inference=None).to_dict()
    assert set(document) == set(CaseReportDict.__annotations__)
    assert document["evaluation"] is None and document["dicom"] is None
    assert document["quality"] is None and document["inference"] is None


def test_paths_are_rendered_by_the_caller():
    document = _report().to_dict(paths=lambda p: Path(p).name)
    assert document["outputs"] == {"segmentation": "c1_seg.nii.gz"}
    assert document["inputs"] == {"t1": "c1_t1.nii.gz"}
    assert document["evaluation"]["reference"] == "c1_seg.nii.gz"


def test_a_wrong_document_fails_the_schema():
    document = json.loads(json.dumps(_report().to_dict()))
    del document["volumes_ml"]
    with pytest.raises(ValueError):
        TypeAdapter(CaseReportDict).validate_python(document)


def test_a_stored_document_from_before_the_version_is_upgraded():
    legacy = {
        "volumes_ml": {"WT": 1.0, "TC": 0.5, "ET": 0.2},
        "label_convention": 3,
        "shape": [4, 5, 6],
        "spacing_mm": [1.0, 1.0, 1.0],
        "timings_s": {"total": 2.0},
        "warnings": ["from the result"],
        "quality": {"review_recommended": False, "flags": [], "measures": {}, "notes": []},
        "dicom": {"series": {}, "resampled": [], "warnings": ["from the study"]},
        "reference": {"WT": SCORES.to_dict(), "TC": SCORES.to_dict(), "ET": SCORES.to_dict()},
    }
    upgraded = upgrade_report(legacy)
    TypeAdapter(CaseReportDict).validate_python(upgraded)
    assert upgraded["warnings"] == ["from the study", "from the result"]
    assert upgraded["evaluation"]["metrics"]["WT"]["dice"] == pytest.approx(0.9)
    assert upgraded["label_convention"] == 3
    current = _report().to_dict()
    assert upgrade_report(current) == current


def test_the_api_schema_is_the_report_type():
    from service.app import create_app

    schemas = create_app().openapi()["components"]["schemas"]
    assert set(schemas["CaseReportDict"]["properties"]) == set(CaseReportDict.__annotations__)
    assert "report_version" in schemas["CaseReportDict"]["required"]
