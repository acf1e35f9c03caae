"""Tests of ``omnet train`` (service/cli/train.py) through the real entry point.

One tiny run (three 48 x 48 x 32 phantom cases, width 4, four steps) is shared by the
tests that read its results.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import model.training.data
from model.io.phantom import write_phantom
from model.net.checkpoint import load_checkpoint
from service.cli import main

CASES = ("Brats18_P_1_1", "Brats18_P_2_1", "Brats18_P_3_1")
SMALL = [
    "--width",
    "4",
    "--epochs",
    "1",
    "0",
    "1",
    "--steps-per-epoch",
    "2",
    "--batch-per-task",
    "2",
    "--val-tiling",
    "wide",
    "--device",
    "cpu",
    "--max-minutes",
    "5",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for seed, name in enumerate(CASES):
        write_phantom(root, name=name, shape=(48, 48, 32), seed=seed)
    return root


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *SMALL]) == 0
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("omnet train: error:") and "Traceback" not in err
    return err


def _global_step(run: Path) -> int:
    return torch.load(run / "state.pt", weights_only=False)["state"]["global_step"]


def test_train_writes_a_complete_run(finished_run, data):
    for name in ("run.json", "state.pt", "train.jsonl", "best.pt", "last.pt"):
        assert (finished_run / name).is_file(), name
    run = json.loads((finished_run / "run.json").read_text())
    assert run["config"]["width"] == 4 and run["config"]["stage_epochs"] == [1, 0, 1]
    assert len(run["train_cases"]) == 2 and len(run["val_cases"]) == 1
    assert set(run["train_cases"]) | set(run["val_cases"]) == set(CASES)
    assert run["data"] == [str(data.resolve())]
    assert set(run["case_dirs"]) == {*run["train_cases"], *run["val_cases"]}
    assert Path(run["cache"]) == (finished_run.parent / "cache").resolve()
    assert {p.name for p in Path(run["cache"]).iterdir()} == set(run["train_cases"])
    assert _global_step(finished_run) == 4
    lines = [json.loads(line) for line in (finished_run / "train.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["active"] for r in epochs] == [[True, False, False], [True, True, True]]
    assert all(set(r["validation"]["dice"]) == {"WT", "TC", "ET"} for r in epochs)
    best = load_checkpoint(finished_run / "best.pt")
    assert best.config.width == 4
    assert best.metadata["training"]["data"]["val_cases"] == run["val_cases"]


def test_resume_of_a_finished_run_takes_no_more_steps(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    log = (run / "train.jsonl").read_text()
    assert main(["train", "--resume", str(run)]) == 0
    assert _global_step(run) == 4
    assert (run / "train.jsonl").read_text() == log
    assert "done: 4 steps" in capsys.readouterr().err


def test_missing_data_is_one_line_and_non_zero(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *SMALL]) != 0
    assert "--data" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_out_of_an_existing_run_refuses(finished_run, data, capsys):
    before = (finished_run / "run.json").read_text()
    assert main(["train", "--data", str(data), "--out", str(finished_run), *SMALL]) != 0
    assert "--resume" in _one_error_line(capsys)
    assert (finished_run / "run.json").read_text() == before


def test_resume_of_a_folder_without_a_run_refuses(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) != 0
    assert "run.json" in _one_error_line(capsys)


class _SamplerBuiltError(RuntimeError):
    pass


@pytest.mark.parametrize(
    ("extra", "transfer"),
    [([], True), (["--no-transfer"], False), (["--variant", "mc_cascade"], False)],
)
def test_sampler_transfer_follows_the_switches(
    data, finished_run, tmp_path, monkeypatch, extra, transfer
):
    seen = {}

    class Recording(model.training.data.PatchSampler):
        def __init__(self, cases, batch_per_task, transfer, seed, **options):
            super().__init__(cases, batch_per_task, transfer, seed, **options)
            seen.update(transfer=self.transfer, batch=self.batch_per_task, cases=len(cases))
            raise _SamplerBuiltError("sampler built")  # no need to train

    monkeypatch.setattr(model.training.data, "PatchSampler", Recording)
    cache = json.loads((finished_run / "run.json").read_text())["cache"]
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--cache", cache]
    assert main([*args, *SMALL, *extra]) != 0
    assert seen == {"transfer": transfer, "batch": 2, "cases": 2}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resume_uses_the_device_asked_for(finished_run, tmp_path, capsys):
    # --device on --resume was once ignored in favour of the run's own device.
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    assert main(["train", "--resume", str(run), "--device", "cuda"]) != 0
    assert "no CUDA GPU" in _one_error_line(capsys)


def test_several_data_folders_and_a_duplicate_case(data, tmp_path, capsys):
    second = tmp_path / "second"
    write_phantom(second, name="Brats18_Q_9_1", shape=(48, 48, 32), seed=9)
    out = tmp_path / "run"
    args = ["train", "--data", str(data), str(second), "--out", str(out), *SMALL]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert set(run["case_dirs"]) == {*CASES, "Brats18_Q_9_1"}
    assert Path(run["case_dirs"]["Brats18_Q_9_1"]).parent == second.resolve()

    capsys.readouterr()
    write_phantom(second, name=CASES[0], shape=(48, 48, 32), seed=1)
    again = ["train", "--data", str(data), str(second), "--out", str(tmp_path / "r2"), *SMALL]
    assert main(again) != 0
    assert "only once" in _one_error_line(capsys)


def test_validation_tiling_defaults_to_the_segment_default_and_checks_its_name(capsys):
    from model.training.config import TrainConfig
    from service.cli import build_parser

    parser = build_parser()
    base = ["train", "--data", "d", "--out", "o"]
    assert parser.parse_args(base).val_tiling == "wide" == TrainConfig().val_tiling
    assert parser.parse_args([*base, "--val-tiling", "paper"]).val_tiling == "paper"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*base, "--val-tiling", "slow"])
    assert exc.value.code == 2
    assert "slow" in capsys.readouterr().err


def test_augment_flag_chooses_the_augmentation_set():
    from model.training.augment import AugmentConfig
    from model.training.config import TrainConfig
    from service.cli import build_parser
    from service.cli.train import _augment_config

    parser = build_parser()
    base = ["train", "--data", "d", "--out", "o"]
    assert parser.parse_args(base).augment is None
    assert parser.parse_args([*base, "--augment"]).augment == "default"
    assert parser.parse_args([*base, "--augment", "site"]).augment == "site"
    assert _augment_config(TrainConfig()) is None
    assert _augment_config(TrainConfig(augment=True)) == AugmentConfig()
    site = TrainConfig(augment=True, augment_preset="site")
    assert _augment_config(site) == AugmentConfig.site_shift()
    assert TrainConfig.from_dict(site.to_dict()) == site  # a resumed run keeps it
    with pytest.raises(ValueError, match="augment_preset"):
        TrainConfig(augment_preset="strong")


def test_normalisation_flag_reaches_the_cache_and_the_checkpoints(data, tmp_path, capsys):
    out = tmp_path / "landmarks"
    tiny = [*SMALL, "--epochs", "1", "0", "0", "--steps-per-epoch", "1"]
    assert (
        main(
            ["train", "--data", str(data), "--out", str(out), *tiny, "--normalisation", "landmarks"]
        )
        == 0
    )
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["normalisation"] == "landmarks"
    metas = [json.loads(p.read_text()) for p in Path(run["cache"]).glob("*/meta.json")]
    assert metas and {m["normalisation"] for m in metas} == {"landmarks"}
    assert load_checkpoint(out / "last.pt").config.normalisation == "landmarks"
    dice = tmp_path / "dice"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(dice),
                *tiny,
                "--loss",
                "cross-entropy+dice",
            ]
        )
        == 0
    )
    trained = load_checkpoint(dice / "last.pt").metadata["training"]["config"]
    assert trained["loss"] == "cross-entropy+dice"
    bad = ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--normalisation", "z"]
    with pytest.raises(SystemExit) as exit_info:
        main(bad)
    assert exit_info.value.code == 2
    assert "argument --normalisation: invalid choice: 'z'" in capsys.readouterr().err
