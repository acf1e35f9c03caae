"""``omnet segment --dicom-seg`` on the DICOM conformance corpus (tests/dicom_corpus.py).

One run of the command over every variant (the model loaded once): each variant gets
the plain study's labels and a SEG of them, or one line on stderr saying what was
wrong and what to do, with nothing written for it. A DICOM output that fails after
inference keeps the NIfTI outputs and metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.io.dicom.seg import read_dicom_seg
from model.io.dicom.study import read_dicom_study
from service.cli import main
from tests.dicom_corpus import SEG_REFUSED, VARIANTS

pytestmark = pytest.mark.data


@dataclass(frozen=True)
class Run:
    status: int
    out: Path
    stdout: str
    stderr: str


def _segment(inputs: list[Path], out: Path, checkpoint: Path) -> Run:
    args = ["segment", *map(str, inputs), "--out", str(out), "--checkpoint", str(checkpoint)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main([*args, "--tiling", "wide", "--dicom-seg"])
    return Run(status, out, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def run(dicom_corpus, tiny_checkpoint, tmp_path_factory) -> Run:
    folders = [dicom_corpus.variants[name].folder for name in VARIANTS]
    return _segment(folders, tmp_path_factory.mktemp("cli-corpus"), tiny_checkpoint)


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_the_run_reports_each_failed_variant(run):
    failed = [n for n, expect in VARIANTS.items() if expect is not None or n in SEG_REFUSED]
    assert run.status == 1
    assert f"{len(failed)} of {len(VARIANTS)} cases failed: {', '.join(failed)}" in run.stderr


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "plain"])
def test_variant_segments_like_the_plain_study_or_says_what_to_do(dicom_corpus, run, name):
    variant = dicom_corpus.variants[name]
    errors = [
        line for line in run.stderr.splitlines() if line.startswith(f"omnet segment: {name}:")
    ]
    errors = [line for line in errors if ": error: " in line]
    if variant.code is None and not variant.seg_refused:
        assert errors == []
        labels = _labels(run.out / f"{name}_seg.nii.gz")
        assert np.array_equal(labels, _labels(run.out / "plain_seg.nii.gz"))
        assert np.any(labels)  # something to compare: the tiny model labels some voxels
        study = read_dicom_study(variant.folder)
        seg = read_dicom_seg(run.out / f"{name}_seg.dcm", study.reference, study.frames)
        assert np.array_equal(seg, labels)
        metrics = json.loads((run.out / f"{name}_metrics.json").read_text())
        assert metrics["outputs"]["dicom_seg"].endswith(f"{name}_seg.dcm")
        return
    (line,) = errors  # one line, no traceback
    assert "Traceback" not in run.stderr
    for words in variant.words:
        assert words in line
    if variant.seg_refused:
        assert "the DICOM SEG cannot be written" in line
        assert "leave out --dicom-seg" in line and "nothing was segmented" in line
    assert not list(run.out.glob(f"{name}_*"))  # refused before inference


def test_a_seg_that_fails_after_inference_keeps_the_nifti(
    dicom_corpus, tiny_checkpoint, tmp_path, monkeypatch
):
    import model.io.dicom.outputs as outputs_module
    import model.io.dicom.seg as seg_module

    real = outputs_module.atomic_write

    def full_disk(path, write):
        if path.suffix == ".dcm":
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(outputs_module, "atomic_write", full_disk)
    monkeypatch.setattr(seg_module, "atomic_write", full_disk)
    result = _segment([dicom_corpus.variants["type2_absent"].folder], tmp_path, tiny_checkpoint)
    assert result.status == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line == (
        "omnet segment: error: the DICOM SEG could not be written ([Errno 28] No space left on "
        f"device); the NIfTI outputs and metrics of type2_absent are kept in {tmp_path}"
    )
    assert result.stdout.startswith("type2_absent: WT ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "type2_absent_metrics.json",
        "type2_absent_seg.nii.gz",
    ]
    metrics = json.loads((tmp_path / "type2_absent_metrics.json").read_text())
    assert any("could not be written" in w for w in metrics["warnings"])
