"""The model shipped in model/weights: it loads, says what it is and how well to expect it
to do on cases it never saw, and segments a real case."""

import json
from pathlib import Path

import numpy as np
import pytest

from model.defaults import DEFAULT_TILING
from model.evaluation.metrics import evaluate_case
from model.inference.pipeline import load_predictor, segment_case
from model.inference.tiling import TILINGS
from model.io.nifti.files import find_label_file
from model.io.nifti.read import load_case, load_labels
from model.labels import ENHANCING
from model.net.checkpoint import load_checkpoint
from model.training.data import SPLITS_DIR, read_split
from model.weights import bundled_checkpoint
from tests.conftest import bench_module

BUNDLED = bundled_checkpoint()
pytestmark = pytest.mark.skipif(BUNDLED is None, reason="this install ships no bundled model")
ROOT = Path(__file__).resolve().parents[2]
REGIONS = ("WT", "TC", "ET")


def _every_case() -> list[str]:
    """The 34 cases of the cross-validation's five folds."""
    return sorted(n for k in range(5) for n in read_split(SPLITS_DIR / f"cv5_fold{k}_val.txt"))


def test_bundled_checkpoint_states_what_it_is():
    ckpt = load_checkpoint(BUNDLED)
    assert ckpt.config.variant == "omnet_cga"
    info = ckpt.metadata["bundled"]
    every_case = _every_case()
    assert info["training_cases"] == every_case
    assert "34 real cases" in info["trained_on"]
    # Trained to the end with the recipe the cross-validation measured.
    bundle = bench_module("bundle.py", "bundle_for_test")
    crossval = ROOT / info["expected_accuracy"]["crossval"]
    fold0 = json.loads((crossval / "fold0" / "run.json").read_text())
    # (a recipe stored before an option existed trained with that option's default)
    assert bundle.recipe(info["recipe"]) == bundle.recipe(fold0["config"])
    steps = sum(info["recipe"]["stage_epochs"]) * info["recipe"]["steps_per_epoch"]
    assert ckpt.metadata["training"]["steps"] == info["training_steps"] == steps
    # Its expected accuracy: every case scored out of fold.
    expected = info["expected_accuracy"]
    assert expected["cases"] == len(every_case)
    assert sorted(expected["dice_per_case_WT"]) == every_case
    groups = {"CBICA", "2013", "TCIA01", "TCIA02", "TCIA10", "BraTS2021"}
    assert set(expected["dice_by_group"]) == groups
    assert sum(g["cases"] for g in expected["dice_by_group"].values()) == len(every_case)
    assert sorted(expected["dice_by_fold"]) == [f"fold{k}" for k in range(5)]
    for region in REGIONS:
        low, high = expected["dice_ci95"][region]
        assert 0.0 <= low <= expected["dice_mean"][region] <= high <= 1.0
    nested = info["quality_flag"]["nested_cross_validation"]
    assert nested["failures"] == len(expected["cases_below_WT_0_70"])


@pytest.mark.data
def test_bundled_model_segments_a_real_case(tmp_path):
    """An end-to-end check of the shipped weights on a real case (one it trained on:
    every case did; its accuracy on unseen cases is the card's out-of-fold figure)."""
    from tests.conftest import data_dir

    name = read_split(SPLITS_DIR / "brats2018_val.txt")[0]
    folder = data_dir() / "brats2018" / name
    if not folder.is_dir():
        pytest.skip(f"case {name} not under {data_dir()} (set OMNET_DATA_DIR)")
    case = load_case(folder)
    reference = load_labels(find_label_file(folder), like=case)
    predictor, _ = load_predictor([BUNDLED], device="cpu", layout=TILINGS[DEFAULT_TILING])
    seg = segment_case(case, predictor)
    assert seg.labels.shape == case.shape and seg.labels.dtype == np.uint8
    assert set(np.unique(seg.labels)) <= {0, 1, 2, 4}
    scores = evaluate_case(seg.labels, reference, case.spacing, ENHANCING, ENHANCING)
    assert scores["WT"].dice > 0.5, scores["WT"]
