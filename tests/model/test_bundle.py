"""bench/bundle.py: a finished final run becomes the bundled model only with the
recipe the cross-validation measured, and its card carries the out-of-fold figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.inference.lesions import TASK_AGREEMENT
from model.net.checkpoint import load_checkpoint, save_checkpoint
from model.net.network import ArchConfig, build_model
from tests.conftest import bench_module

CONFIG = {
    "width": 4,
    "stage_epochs": [1, 1, 2],
    "steps_per_epoch": 5,
    "task1_tumour_fraction": 0.5,
    "augment": True,
    "val_every": 4,
}
#: Case -> (fold, WT Dice, task agreement): two failures, one of them with agreeing tasks.
CASES = {
    "Brats18_CBICA_AAA_1": ("fold0", 0.90, 0.95),
    "Brats18_CBICA_AAB_1": ("fold0", 0.40, 0.80),
    "Brats18_TCIA01_100_1": ("fold1", 0.85, 0.93),
    "Brats18_2013_1_1": ("fold1", 0.60, 0.95),
    "BraTS2021_00001": ("fold1", 0.95, 0.96),
}


def _run(folder: Path, config: dict, cases: list[str], held_out: list[str], steps: int) -> Path:
    folder.mkdir(parents=True)
    info = {"config": config, "train_cases": cases, "val_cases": held_out}
    (folder / "run.json").write_text(json.dumps(info))
    torch.manual_seed(0)
    arch = ArchConfig(width=config["width"])
    save_checkpoint(folder / "last.pt", build_model(arch), arch, {"training": {"steps": steps}})
    return folder


#: The default inference's accuracy setting.
SETTING = "oof/wide+lesion+guard+mirror+noshell+joint"


def _oof(path: Path) -> Path:
    per_case, measures = {}, {}
    for name, (_, wt, agreement) in CASES.items():
        per_case[name] = {
            "WT": {"dice": wt, "hd95": 5.0},
            "TC": {"dice": wt - 0.1, "hd95": 8.0},
            "ET": {"dice": None if name.startswith("BraTS2021") else 0.5, "hd95": None},
        }
        measures[name] = {"task_agreement": agreement, "wt_ml": 50.0, "tc_ml": 20.0}
    result = {"per_case": per_case, "flags": {n: [] for n in CASES}, "quality_measures": measures}
    folds = {name: fold for name, (fold, _, _) in CASES.items()}
    path.write_text(json.dumps({"folds": folds, "results": {SETTING: result}}))
    return path


@pytest.fixture
def bundle_bench():
    return bench_module("bundle.py", "bundle_bench")


@pytest.fixture
def crossval(tmp_path) -> Path:
    for k in range(2):
        config = {**CONFIG, "seed": k, "checkpoint_every": 50}
        _run(tmp_path / "cv" / f"fold{k}", config, [], ["x"], 20)
    return tmp_path / "cv"


def test_final_run_is_bundled_with_its_out_of_fold_card(tmp_path, bundle_bench, crossval):
    run = _run(tmp_path / "final", {**CONFIG, "val_every": 1}, sorted(CASES), [], 20)
    out = tmp_path / "bundled.pt"
    card = bundle_bench.bundle(run, crossval, _oof(tmp_path / "oof.json"), SETTING, out)

    ckpt = load_checkpoint(out)
    assert ckpt.metadata["bundled"] == card
    assert all(
        v.dtype == torch.float16
        for v in torch.load(out)["state_dict"].values()
        if v.is_floating_point()
    )
    assert card["training_cases"] == sorted(CASES)
    assert card["trained_on"].endswith("2013 1, BraTS2021 1, CBICA 2, TCIA01 1")
    accuracy = card["expected_accuracy"]
    assert accuracy["crossval"] == str(crossval)
    assert accuracy["cases"] == 5
    assert accuracy["dice_mean"]["WT"] == pytest.approx(0.74)
    assert accuracy["dice_mean"]["ET"] == pytest.approx(0.5)  # the unscored region left out
    assert accuracy["dice_worst"]["WT"] == [0.4, "Brats18_CBICA_AAB_1"]
    assert accuracy["dice_by_fold"]["fold0"] == {"cases": 2, "WT": 0.65, "TC": 0.55, "ET": 0.5}
    assert accuracy["dice_by_group"]["CBICA"]["cases"] == 2
    assert accuracy["cases_below_WT_0_70"] == ["Brats18_2013_1_1", "Brats18_CBICA_AAB_1"]
    flag = card["quality_flag"]
    assert flag["flag"] == "task_disagreement" and str(TASK_AGREEMENT) in flag["rule"]
    # Each fold's rule is chosen on the other fold alone: fold 1 holds one failure whose
    # tasks agree, which no agreement rule separates; fold 0 the one whose tasks disagree.
    assert flag["nested_cross_validation"]["failures"] == 2
    assert flag["nested_cross_validation"]["others"] == 3


def test_a_run_of_another_recipe_or_unfinished_is_refused(tmp_path, bundle_bench, crossval):
    oof = _oof(tmp_path / "oof.json")
    other = _run(tmp_path / "other", {**CONFIG, "augment": False}, sorted(CASES), [], 20)
    with pytest.raises(SystemExit, match="augment"):
        bundle_bench.bundle(other, crossval, oof, SETTING, tmp_path / "a.pt")
    short = _run(tmp_path / "short", CONFIG, sorted(CASES), [], 19)
    with pytest.raises(SystemExit, match="step 19 of 20"):
        bundle_bench.bundle(short, crossval, oof, SETTING, tmp_path / "b.pt")
    held = _run(tmp_path / "held", CONFIG, sorted(CASES)[:3], sorted(CASES)[3:], 20)
    with pytest.raises(SystemExit, match="held out 2 cases"):
        bundle_bench.bundle(held, crossval, oof, SETTING, tmp_path / "c.pt")
    assert bundle_bench.DEFAULT_SETTING == SETTING
    run = _run(tmp_path / "run", CONFIG, sorted(CASES), [], 20)
    for setting in (
        "oof/wide+lesion+guard+noshell+joint",
        "oof/paper+lesion+guard+mirror+noshell+joint",
        "oof/wide+lesion+noshell+joint",
        "oof/wide+lesion+guard+mirror+joint",  # the earlier rule: shells spared for their core
        "oof/wide+lesion+guard+mirror+noshell",  # the paper's arg-max fusion
    ):
        with pytest.raises(SystemExit, match="is not the default inference"):
            bundle_bench.bundle(run, crossval, oof, setting, tmp_path / "d.pt")
    assert not list(tmp_path.glob("*.pt"))
