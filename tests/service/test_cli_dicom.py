"""``omnet segment`` on DICOM studies: a folder or a zip in, NIfTI and DICOM SEG out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from model.io.dicom.protocols import StudyInfo
from model.io.dicom.seg import read_dicom_seg
from model.io.dicom.study import read_dicom_study
from model.io.dicom.write_series import write_study
from model.io.phantom import make_phantom
from model.net.checkpoint import save_checkpoint
from model.net.network import ArchConfig, build_model
from service.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ArchConfig(width=4)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", build_model(config), config)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A phantom study folder ``mri1`` (32 x 32 x 24)."""
    images, _, affine = make_phantom((32, 32, 24), seed=5)
    folder = tmp_path_factory.mktemp("dicom") / "mri1"
    write_study(images, affine, folder, study=StudyInfo(patient_id="P7"))
    return folder


def _segment(inputs, out, checkpoint, *extra) -> int:
    args = ["segment", *map(str, inputs), "--out", str(out), "--checkpoint", str(checkpoint)]
    return main([*args, "--tiling", "wide", *extra])


def test_dicom_folder_gives_nifti_and_seg(study, checkpoint, tmp_path, capsys):
    assert _segment([study], tmp_path, checkpoint, "--dicom-seg", "--preview") == 0
    assert "mri1:" in capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "mri1_metrics.json",
        "mri1_preview.dcm",
        "mri1_preview.png",
        "mri1_seg.dcm",
        "mri1_seg.nii.gz",
    ]
    reference = read_dicom_study(study).reference
    labels = np.asarray(nib.load(tmp_path / "mri1_seg.nii.gz").dataobj)
    assert np.array_equal(read_dicom_seg(tmp_path / "mri1_seg.dcm", reference), labels)
    seg = pydicom.dcmread(tmp_path / "mri1_seg.dcm", stop_before_pixels=True)
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "omnet" and "tiny.pt" in str(algorithm.AlgorithmParameters)
    assert seg.PatientID == "P7"
    metrics = json.loads((tmp_path / "mri1_metrics.json").read_text())
    assert set(metrics["dicom"]["series"]) == {"t1", "t1ce", "t2", "flair"}
    assert metrics["dicom"]["series"]["t1ce"]["description"] == "T1 post contrast"
    assert metrics["outputs"]["dicom_seg"].endswith("mri1_seg.dcm")


def test_dicom_zip_with_series_override(study, checkpoint, tmp_path):
    archive = shutil.make_archive(str(tmp_path / "zipped"), "zip", study)
    t2 = read_dicom_study(study).series["t2"]
    out = tmp_path / "out"
    assert _segment([archive], out, checkpoint, "--series", f"t2={t2.uid}", "--dicom-seg") == 0
    assert (out / "zipped_seg.dcm").is_file() and (out / "zipped_seg.nii.gz").is_file()


def test_dicom_problem_is_one_line(study, checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(study, broken)
    shutil.rmtree(next(p for p in broken.iterdir() if p.name.endswith("_flair")))
    assert _segment([broken], tmp_path / "out", checkpoint) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no series recognised as flair" in err and "Traceback" not in err


def test_skull_warning_goes_to_stderr(checkpoint, tmp_path, capsys):
    images, _, affine = make_phantom((32, 32, 24), seed=6)
    air = images == 0
    images[air] = np.random.default_rng(0).integers(5, 40, size=int(air.sum()))  # not stripped
    write_study(images, affine, tmp_path / "head")
    assert _segment([tmp_path / "head"], tmp_path / "out", checkpoint) == 0
    err = capsys.readouterr().err
    assert "head: warning: the T1ce does not look skull-stripped" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--dicom-seg"], "--dicom-seg needs DICOM inputs"), (["--series", "t1=1.2"], "--series")],
)
def test_dicom_options_need_a_dicom_input(tmp_path, checkpoint, capsys, extra, message):
    from model.io.phantom import write_phantom

    write_phantom(tmp_path, name="nifti", shape=(32, 32, 24))
    assert _segment([tmp_path / "nifti"], tmp_path / "out", checkpoint, *extra) != 0
    assert message in capsys.readouterr().err


def test_bad_series_option(study, checkpoint, tmp_path, capsys):
    assert _segment([study], tmp_path, checkpoint, "--series", "t1ce") != 0
    assert "--series: a series override is MOD=UID" in capsys.readouterr().err
