import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model import weights
from model.defaults import DEFAULT_FUSION, DEFAULT_TTA
from model.io.phantom import write_phantom
from model.net.checkpoint import save_checkpoint
from model.net.network import ArchConfig, build_model
from service.cli import main
from service.cli import segment as segment_command


def test_model_info_json_reports_paper_count(capsys):
    assert main(["model-info", "--variant", "omnet_cga", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "omnet_cga"
    assert abs(info["parameters"] - 13.814e6) / 13.814e6 < 1e-3
    assert info["flops_per_patch"] > 1e10


def test_model_info_text_small_width(capsys):
    assert main(["model-info", "--variant", "omnet", "--width", "4"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs" in out


def test_bad_width_is_one_line_and_non_zero(capsys):
    assert main(["model-info", "--width", "-1"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "width" in err and "Traceback" not in err


def test_unknown_variant_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["model-info", "--variant", "unet"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------- phantom,
# segment and evaluate, on 32 x 32 x 24 phantoms with a width-4 checkpoint.
SHAPE = ["32", "32", "24"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ArchConfig(width=4)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", build_model(config), config)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """A folder of two phantom case folders, alpha and beta."""
    root = tmp_path_factory.mktemp("cases")
    for seed, name in enumerate(("alpha", "beta")):
        write_phantom(root, name=name, shape=(32, 32, 24), seed=seed)
    return root


@pytest.fixture(scope="module")
def segmented(cases, checkpoint, tmp_path_factory) -> Path:
    """Outputs of segmenting case alpha with every optional output."""
    out = tmp_path_factory.mktemp("out")
    args = ["segment", str(cases / "alpha"), "--out", str(out), "--checkpoint", str(checkpoint)]
    assert main([*args, "--preview", "--probabilities", "--evaluate"]) == 0
    return out


def _segment(inputs, out, checkpoint, *extra) -> int:
    return main(
        ["segment", *map(str, inputs), "--out", str(out), "--checkpoint", str(checkpoint), *extra]
    )


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_parser_imports_no_torch():
    code = (
        "import sys; from service.cli import build_parser; build_parser(); "
        "print(sorted(sys.modules))"
    )
    modules = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'torch'" not in modules and "'model.net.network'" not in modules


def test_phantom_writes_five_files(tmp_path, capsys):
    assert main(["phantom", str(tmp_path), "--name", "demo", "--seed", "3", "--shape", *SHAPE]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.split()]
    expected = {
        tmp_path / "demo" / f"demo_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg")
    }
    assert set(printed) == expected
    assert set((tmp_path / "demo").iterdir()) == expected
    assert nib.load(tmp_path / "demo" / "demo_t1.nii.gz").shape == (32, 32, 24)


def test_segment_writes_labels_on_the_input_grid(segmented, cases):
    t1 = nib.load(cases / "alpha" / "alpha_t1.nii.gz")
    seg = nib.load(segmented / "alpha_seg.nii.gz")
    assert seg.shape == t1.shape
    np.testing.assert_allclose(seg.affine, t1.affine)
    assert seg.get_data_dtype() == np.uint8
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    assert (labels == 4).any()  # the seeded random net predicts some ET (used below)


def test_segment_writes_metrics_preview_and_probabilities(segmented, cases):
    report = json.loads((segmented / "alpha_metrics.json").read_text())
    labels = np.asarray(nib.load(segmented / "alpha_seg.nii.gz").dataobj)
    assert report["case"] == "alpha"
    assert report["volumes_ml"]["WT"] == pytest.approx(np.count_nonzero(labels) / 1000.0)
    assert report["volumes_ml"]["ET"] == pytest.approx(np.count_nonzero(labels == 4) / 1000.0)
    assert report["tiles"] > 0
    for stage in ("load", "preprocess", "inference", "fusion", "postprocess", "write", "total"):
        assert report["timings_s"][stage] >= 0
    evaluation = report["evaluation"]
    assert evaluation["reference"].endswith("alpha_seg.nii.gz")
    assert set(evaluation["metrics"]) == {"WT", "TC", "ET"}
    assert 0 <= evaluation["metrics"]["WT"]["dice"] <= 1

    with open(segmented / "alpha_preview.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    probs = nib.load(segmented / "alpha_probabilities.nii.gz").get_fdata()
    assert probs.shape == (32, 32, 24, 4)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-4)


def test_label_convention_3_writes_3_not_4(segmented, cases, checkpoint, tmp_path):
    assert _segment([cases / "alpha"], tmp_path, checkpoint, "--label-convention", "3") == 0
    seg4 = np.asarray(nib.load(segmented / "alpha_seg.nii.gz").dataobj)
    seg3 = np.asarray(nib.load(tmp_path / "alpha_seg.nii.gz").dataobj)
    assert (seg3 == 3).any() and not (seg3 == 4).any()
    np.testing.assert_array_equal(seg3, np.where(seg4 == 4, 3, seg4))


def test_segment_folder_of_cases(cases, checkpoint, tmp_path, capsys):
    assert _segment([cases], tmp_path, checkpoint, "--tiling", "paper") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        assert (tmp_path / f"{name}_seg.nii.gz").is_file()
        report = json.loads((tmp_path / f"{name}_metrics.json").read_text())
        assert report["inference"]["tiling"] == "paper"


@pytest.mark.parametrize(
    ("flags", "rule"), [((), DEFAULT_FUSION), (("--fusion", "argmax"), "argmax")]
)
def test_segment_records_its_fusion_rule(cases, checkpoint, tmp_path, flags, rule):
    assert _segment([cases / "alpha"], tmp_path, checkpoint, *flags) == 0
    inference = json.loads((tmp_path / "alpha_metrics.json").read_text())["inference"]
    assert inference["fusion"] == rule


@pytest.mark.parametrize(
    ("flags", "mode"),
    [((), DEFAULT_TTA), (("--tta",), "all"), (("--tta-mode", "off"), "off")],
)
def test_segment_records_its_tta_mode(cases, checkpoint, tmp_path, flags, mode):
    assert _segment([cases / "alpha"], tmp_path, checkpoint, *flags) == 0
    inference = json.loads((tmp_path / "alpha_metrics.json").read_text())["inference"]
    assert (inference["tta_mode"], inference["tta"]) == (mode, mode != "off")


def test_segment_four_files(cases, checkpoint, tmp_path):
    folder = cases / "beta"
    files = [f"--{m}={folder / f'beta_{m}.nii.gz'}" for m in ("t1", "t1ce", "t2", "flair")]
    assert main(["segment", *files, "--out", str(tmp_path), "--checkpoint", str(checkpoint)]) == 0
    seg = nib.load(tmp_path / "beta_seg.nii.gz")
    assert seg.shape == (32, 32, 24)
    report = json.loads((tmp_path / "beta_metrics.json").read_text())
    assert report["inputs"]["flair"] == str(folder / "beta_flair.nii.gz")
    assert report["evaluation"] is None  # no --evaluate: null, the key is always there


def test_segment_bad_case_in_a_batch_does_not_stop_the_others(cases, checkpoint, tmp_path, capsys):
    batch = tmp_path / "batch"
    write_phantom(batch, name="good", shape=(32, 32, 24))
    broken = write_phantom(batch, name="broken", shape=(32, 32, 24))
    broken["t2"].unlink()
    assert _segment([batch], tmp_path / "out", checkpoint) != 0
    captured = capsys.readouterr()
    assert captured.out.startswith("good:")
    # (a phantom is no real brain: its quality review warning is not an error line)
    err = [line for line in captured.err.strip().splitlines() if ": warning: " not in line]
    assert len(err) == 2 and "Traceback" not in captured.err
    assert err[0].startswith("omnet segment: broken: error:") and "t2" in err[0]
    assert "1 of 2 cases failed" in err[1]
    assert (tmp_path / "out" / "good_seg.nii.gz").is_file()
    assert not (tmp_path / "out" / "broken_seg.nii.gz").exists()


def test_segment_missing_modality(cases, checkpoint, tmp_path, capsys):
    folder = tmp_path / "case"
    folder.mkdir()
    for m in ("t1", "t1ce", "flair"):
        (folder / f"case_{m}.nii.gz").write_bytes(
            (cases / "alpha" / f"alpha_{m}.nii.gz").read_bytes()
        )
    assert _segment([folder], tmp_path / "out", checkpoint) != 0
    err = _one_error_line(capsys)
    assert "no file for t2" in err


def test_segment_nonexistent_input(checkpoint, tmp_path, capsys):
    assert _segment([tmp_path / "nowhere"], tmp_path / "out", checkpoint) != 0
    assert "does not exist" in _one_error_line(capsys)


def test_segment_bad_checkpoint(cases, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert _segment([cases / "alpha"], tmp_path / "out", bad) != 0
    assert "bad.pt" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_segment_without_bundled_model_or_checkpoint(cases, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(weights, "BUNDLED_PATH", tmp_path / "omnet_cga.pt")
    assert main(["segment", str(cases / "alpha"), "--out", str(tmp_path / "out")]) != 0
    err = _one_error_line(capsys)
    assert "no bundled model" in err and "--checkpoint" in err


def test_default_checkpoint_is_the_bundled_file(tmp_path, monkeypatch):
    bundled = tmp_path / "omnet_cga.pt"
    bundled.write_bytes(b"")
    monkeypatch.setattr(weights, "BUNDLED_PATH", bundled)
    assert segment_command.default_checkpoint() == bundled


def test_segment_needs_all_four_files(cases, checkpoint, tmp_path, capsys):
    t1 = cases / "alpha" / "alpha_t1.nii.gz"
    argv = ["segment", "--t1", str(t1), "--out", str(tmp_path), "--checkpoint", str(checkpoint)]
    assert main(argv) != 0
    assert "--t1ce, --t2, --flair" in _one_error_line(capsys)


def test_evaluate_file_against_itself(cases, capsys):
    seg = str(cases / "alpha" / "alpha_seg.nii.gz")
    assert main(["evaluate", seg, seg, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_cases"] == 1
    for region in ("WT", "TC", "ET"):
        assert report["cases"]["alpha"]["metrics"][region]["dice"] == 1.0
        assert report["cases"]["alpha"]["metrics"][region]["hd95"] == 0.0
        assert report["mean"][region]["dice"] == 1.0

    assert main(["evaluate", seg, seg, "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("case,region,dice,sensitivity,specificity,ppv,hd95")
    assert [row.split(",")[:3] for row in rows[1:]] == [
        ["alpha", region, "1.0"] for region in ("WT", "TC", "ET")
    ]


def test_evaluate_folders(segmented, cases, tmp_path, capsys):
    # Flat predictions named <case>_seg next to the case folders of the references.
    preds = tmp_path / "preds"
    preds.mkdir()
    for name in ("alpha", "beta"):
        data = (cases / name / f"{name}_seg.nii.gz").read_bytes()
        (preds / f"{name}_seg.nii.gz").write_bytes(data)
    out = tmp_path / "report.txt"
    assert main(["evaluate", str(preds), str(cases), "--output", str(out)]) == 0
    table = out.read_text().splitlines()
    assert table[0].split()[:2] == ["case", "region"]
    assert [line.split()[:3] for line in table[1:4]] == [
        ["alpha", r, "1.0000"] for r in ("WT", "TC", "ET")
    ]
    assert table[-1].startswith("mean (n=2)")
    assert len({len(line) for line in table}) == 1  # aligned columns

    # segment's output folder: <case>_seg, ignoring probabilities, metrics and preview.
    assert main(["evaluate", str(segmented), str(cases), "--format", "json"]) != 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)["cases"]) == {"alpha"}
    assert "no prediction" in captured.err and "beta" in captured.err


def test_evaluate_shape_mismatch_is_one_line(cases, tmp_path, capsys):
    other = write_phantom(tmp_path, name="big", shape=(40, 32, 24))["seg"]
    assert main(["evaluate", str(other), str(cases / "alpha" / "alpha_seg.nii.gz")]) != 0
    assert "shape" in _one_error_line(capsys)


def test_segment_refuses_a_volume_too_small_to_segment(cases, checkpoint, tmp_path, capsys):
    """One slice of a case (48 x 48 x 1 in the issue) is refused before inference, saying
    what is needed; it used to "succeed" with an empty label map."""
    folder = tmp_path / "thin"
    folder.mkdir()
    for m in ("t1", "t1ce", "t2", "flair"):
        img = nib.load(cases / "alpha" / f"alpha_{m}.nii.gz")
        one_slice = np.asarray(img.dataobj)[:, :, 12:13].copy()
        nib.save(nib.Nifti1Image(one_slice, img.affine), folder / f"thin_{m}.nii.gz")
    assert _segment([folder], tmp_path / "out", checkpoint) != 0
    err = _one_error_line(capsys)
    assert err.startswith("omnet segment: ") and "error: t1 file" in err, err
    assert "thin_t1.nii.gz has 32 x 32 x 1 voxels" in err and "at least 16" in err, err
    assert not (tmp_path / "out" / "thin_seg.nii.gz").exists()
