"""Tests of the shipped splits and of institution groups (model/training/data.py,
model/training/splits.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from model.inference.fusion import RegionThresholds
from model.inference.pipeline import SegmentationOptions
from model.io.phantom import write_phantom
from model.training.data import SPLITS_DIR, find_cases_in, institution_group, read_split
from model.training.splits import split_cases
from model.training.trainer import summarise_validation
from tests.conftest import bench_module


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("Brats18_TCIA01_378_1", "TCIA01"),
        ("Brats18_2013_20_1", "2013"),
        ("Brats18_CBICA_AMH_1", "CBICA"),
        ("BraTS2021_00006", "BraTS2021"),
        ("case1", "other"),
    ],
)
def test_institution_group_from_the_name(name, group):
    assert institution_group(name) == group


def test_multisite_split_is_stratified_and_disjoint():
    val = read_split(SPLITS_DIR / "multisite_val.txt")
    train = read_split(SPLITS_DIR / "multisite_train.txt")
    assert len(val) >= 8 and len(set(val)) == len(val)
    assert not set(val) & set(train)
    assert len(val) + len(train) == 34
    groups = {institution_group(n) for n in val}
    assert len(groups) >= 3
    # Every group with at least two cases has one on each side.
    for group in {institution_group(n) for n in val + train}:
        members = [n for n in val + train if institution_group(n) == group]
        if len(members) >= 2:
            assert any(n in val for n in members) and any(n in train for n in members), group
    # The earlier validation cases (never trained on by any bundled model) stay held out.
    assert set(read_split(SPLITS_DIR / "brats2018_val.txt")) <= set(val)


def test_split_cases_prefers_the_multisite_split_when_all_cases_are_there(tmp_path: Path):
    names = read_split(SPLITS_DIR / "multisite_val.txt") + read_split(
        SPLITS_DIR / "multisite_train.txt"
    )
    dirs = [tmp_path / n for n in names]
    train, val = split_cases(dirs)
    assert [p.name for p in val] == sorted(read_split(SPLITS_DIR / "multisite_val.txt"))
    assert len(train) == 34 - len(val)


def test_find_cases_in_several_folders_refuses_a_repeated_name(tmp_path: Path):
    write_phantom(tmp_path / "a", name="x1", shape=(20, 20, 16), seed=0)
    write_phantom(tmp_path / "b", name="x2", shape=(20, 20, 16), seed=1)
    found = find_cases_in([tmp_path / "a", tmp_path / "b"])
    assert found == {"x1": tmp_path / "a" / "x1", "x2": tmp_path / "b" / "x2"}
    write_phantom(tmp_path / "b", name="x1", shape=(20, 20, 16), seed=2)
    with pytest.raises(ValueError, match="x1"):
        find_cases_in([tmp_path / "a", tmp_path / "b"])


def test_validation_summary_weighs_groups_equally():
    per_case = {
        "Brats18_CBICA_A_1": {"WT": 1.0, "TC": 1.0, "ET": 1.0},
        "Brats18_CBICA_B_1": {"WT": 1.0, "TC": 1.0, "ET": 1.0},
        "Brats18_CBICA_C_1": {"WT": 1.0, "TC": 1.0, "ET": 1.0},
        "Brats18_TCIA01_D_1": {"WT": 0.0, "TC": 0.0, "ET": 0.0},
    }
    summary = summarise_validation(per_case)
    assert summary["dice"]["WT"] == pytest.approx(0.75)
    assert summary["dice_by_group"]["WT"] == pytest.approx(0.5)
    assert summary["groups"] == {
        "CBICA": {"WT": 1.0, "TC": 1.0, "ET": 1.0},
        "TCIA01": {"WT": 0.0, "TC": 0.0, "ET": 0.0},
    }


def test_cross_validation_folds_cover_every_case_once_stratified_by_institution():
    """model/splits/cv5_fold*_val.txt (bench/crossval.py folds): the 34 real cases, each
    in one fold; every institution group spread over as many folds as it has cases (up
    to five), fold sizes within one of each other; dealing again gives the same folds."""

    folds = [read_split(SPLITS_DIR / f"cv5_fold{k}_val.txt") for k in range(5)]
    names = [n for fold in folds for n in fold]
    assert len(names) == len(set(names)) == 34
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    groups: dict[str, list[int]] = {}
    for k, fold in enumerate(folds):
        for n in fold:
            groups.setdefault(institution_group(n), []).append(k)
    for group, where in groups.items():
        assert len(set(where)) == min(len(where), 5), (group, where)
    multisite = set(read_split(SPLITS_DIR / "multisite_val.txt"))
    multisite |= set(read_split(SPLITS_DIR / "multisite_train.txt"))
    assert set(names) == multisite  # the same 34 cases as the shipped split

    crossval = bench_module("crossval.py", "crossval")
    assert crossval.deal_folds(names) == [sorted(f) for f in folds]


def test_out_of_fold_scoring_uses_finished_folds_only(tmp_path):
    """bench/accuracy.py --crossval: a case is scored by its fold's model only once that
    fold's run has finished; a fold still training (its last.pt moving) is left out."""

    accuracy = bench_module("accuracy.py", "accuracy_bench")
    for fold in ("fold0", "fold1"):
        (tmp_path / fold).mkdir()
        (tmp_path / fold / "last.pt").write_bytes(b"")
    (tmp_path / "fold0" / "done").write_text("finished\n")
    models = accuracy.crossval_models(tmp_path, "last.pt")
    assert set(models) == set(read_split(SPLITS_DIR / "cv5_fold0_val.txt"))
    assert set(models.values()) == {str(tmp_path / "fold0" / "last.pt")}


def test_site_study_holds_out_every_other_institution_and_varies_one_option(tmp_path):
    """model/splits/sites_val.txt (bench/crossval.py folds) holds every case of the 34
    whose institution is not CBICA; each recipe variant adds one option to the recipe,
    trains on the same seed, and a normalisation variant gets a cache of its own."""

    crossval = bench_module("crossval.py", "crossval_sites")

    names = [n for k in range(5) for n in read_split(SPLITS_DIR / f"cv5_fold{k}_val.txt")]
    held_out = read_split(SPLITS_DIR / "sites_val.txt")
    assert held_out == crossval.site_split(names)
    assert len(held_out) == 10
    assert {institution_group(n) for n in held_out} == {
        "2013", "BraTS2021", "TCIA01", "TCIA02", "TCIA10"
    }  # fmt: skip
    assert all(institution_group(n) == "CBICA" for n in set(names) - set(held_out))

    def plan(*argv):
        parser_args = ["status", *argv, "--runs", str(tmp_path / "runs")]
        seen = []
        crossval.cmd_status = lambda args: seen.extend(crossval.planned_runs(args)) or 0
        crossval.main(parser_args)
        return seen

    sites = plan("--study", "sites", "--variant", "base", "landmarks")
    assert [(r[0], r[1].name, r[2].name, r[3], r[4]) for r in sites] == [
        ("sites base", "base", "sites_val.txt", 0, ()),
        ("sites landmarks", "landmarks", "sites_val.txt", 0, ("--normalisation", "landmarks")),
    ]
    cv = plan("--variant", "site-augment", "--folds", "2")
    assert [(r[0], str(r[1].relative_to(tmp_path)), r[2].name, r[3]) for r in cv] == [
        ("site-augment fold 2", "runs-site-augment/fold2", "cv5_fold2_val.txt", 2)
    ]
    assert cv[0][4] == ("--augment", "site")
    assert crossval._normalisation(("--normalisation", "clipped")) == "clipped"
    assert crossval._normalisation(crossval.RECIPE) == "zscore"
    long = plan("--variant", "landmarks-long", "--folds", "0")
    assert str(long[0][1].relative_to(tmp_path)) == "runs-landmarks-long/fold0"
    assert crossval._normalisation(long[0][4]) == "landmarks"
    dice = plan("--study", "sites", "--variant", "landmarks-dice")
    assert dice[0][1].name == "landmarks-dice"
    assert dice[0][4] == ("--normalisation", "landmarks", "--loss", "cross-entropy+dice")


def test_out_of_fold_tables_combine_per_fold_documents(tmp_path, capsys):
    """bench/accuracy.py --folds K scores one fold; --combine merges the per-fold
    documents into one table (every case once, CPU seconds added up, a row per fold)."""
    import json

    accuracy = bench_module("accuracy.py", "accuracy_combine")
    for fold in ("fold0", "fold1"):
        (tmp_path / fold).mkdir()
        (tmp_path / fold / "last.pt").write_bytes(b"")
        (tmp_path / fold / "done").write_text("finished\n")
    only = accuracy.crossval_models(tmp_path, "last.pt", only=[1])
    assert set(only) == set(read_split(SPLITS_DIR / "cv5_fold1_val.txt"))

    def scores(wt):
        return {r: {"dice": wt, "hd95": 5.0} for r in ("WT", "TC", "ET")}

    paths = []
    for k, wt in ((0, 0.9), (1, 0.5)):
        names = read_split(SPLITS_DIR / f"cv5_fold{k}_val.txt")
        result = {
            "per_case": {n: scores(wt) for n in names},
            "flags": {n: (["rim"] if wt < 0.7 else []) for n in names},
            "cpu_seconds": 10.0 * len(names),
        }
        document = accuracy.print_tables({"oof/wide": result}, accuracy.fold_of(names))
        paths.append(tmp_path / f"f{k}.json")
        paths[-1].write_text(json.dumps(document, default=float))
    capsys.readouterr()
    merged = accuracy.combine(paths)["results"]["oof/wide"]
    out = capsys.readouterr().out
    assert len(merged["per_case"]) == 14
    assert merged["mean"]["WT"]["dice"] == pytest.approx(0.7)
    assert merged["cpu_seconds_per_case"] == pytest.approx(10.0)
    assert merged["quality_flag"]["failures"] == merged["quality_flag"]["failures_flagged"] == 7
    assert merged["quality_flag"]["others_flagged"] == 0
    assert "fold0        n=7   Dice 0.900" in out and "fold1        n=7   Dice 0.500" in out
    with pytest.raises(SystemExit, match="cases scored in two documents"):
        accuracy.combine([paths[0], paths[0]])


def test_the_final_run_holds_out_no_case(tmp_path):
    """bench/crossval.py --study final trains on every case: its validation split
    (model/splits/none_val.txt) names none, and splitting by it keeps all for training."""
    assert read_split(SPLITS_DIR / "none_val.txt") == []
    dirs = [tmp_path / f"Brats18_CBICA_A{i:02d}_1" for i in range(5)]
    train, val = split_cases(dirs, read_split(SPLITS_DIR / "none_val.txt"))
    assert train == dirs and val == []


def test_accuracy_script_runs_end_to_end_and_its_tables_combine(tmp_path, monkeypatch, capsys):
    """bench/accuracy.py's main on two phantom cases with a tiny random model, two
    settings sharing one network pass: the JSON it writes holds every case and setting,
    and --combine reads it back."""
    import json
    import sys

    import torch

    from model.net.checkpoint import save_checkpoint
    from model.net.network import ArchConfig, build_model

    accuracy = bench_module("accuracy.py", "accuracy_main")
    names = ["Brats18_CBICA_P01_1", "Brats18_TCIA01_P02_1"]
    for seed, name in enumerate(names):
        write_phantom(tmp_path / "data", name=name, shape=(40, 40, 24), seed=seed)
    (tmp_path / "split.txt").write_text("\n".join(names) + "\n")
    torch.manual_seed(0)
    config = ArchConfig(width=2)
    checkpoint = save_checkpoint(tmp_path / "m.pt", build_model(config), config)
    out = tmp_path / "out.json"
    argv = ["accuracy.py", "--model", f"tiny={checkpoint}", "--data", str(tmp_path / "data")]
    argv += ["--split", str(tmp_path / "split.txt"), "--setting", "fast", "fast+rm"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    accuracy.main()
    document = json.loads(out.read_text())
    assert set(document["results"]) == {"tiny/fast", "tiny/fast+rm"}
    assert all(set(r["per_case"]) == set(names) for r in document["results"].values())
    assert document["models"]["tiny"] == {n: str(checkpoint) for n in names}
    measures = document["results"]["tiny/fast"]["quality_measures"]
    assert set(measures) == set(names) and all("rim_fraction" in m for m in measures.values())
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--combine", str(out)])
    accuracy.main()
    assert "tiny / fast+rm" in capsys.readouterr().out


def test_accuracy_settings_name_each_lever_once():
    """A setting's levers map onto the pipeline's options; an unknown lever is refused."""
    accuracy = bench_module("accuracy.py", "accuracy_main")
    default = accuracy.Setting.parse("wide+lesion+guard+mirror")
    assert (default.tiling, default.tta, default.precision) == ("wide", "mirror", "auto")
    assert default.options.fusion == "argmax" and default.options.main_lesion_gap_mm
    regions = accuracy.Setting.parse("wide+lesion+guard+mirror+regions")
    assert regions.options.fusion == "regions"
    assert dataclasses.replace(regions.options, fusion="argmax") == default.options
    assert accuracy.Setting.parse("paper+tta+fp32").tta == "all"
    moved = accuracy.Setting.parse("wide+lesion+guard+mirror+regions+wt40+core35")
    assert moved.options.thresholds == RegionThresholds(whole=0.4, core=0.35, enhancing=0.5)
    assert dataclasses.replace(moved.options, thresholds=RegionThresholds()) == regions.options
    with pytest.raises(SystemExit, match="setting"):
        accuracy.Setting.parse("wide+vote")
    with pytest.raises(SystemExit, match="setting"):
        accuracy.Setting.parse("wide+wt4")


def test_quality_flag_thresholds_are_chosen_without_the_fold_they_are_scored_on(tmp_path):
    """bench/quality_flags.py: a measure that separates the failures is found, within the
    false-alarm bound, and each fold's rule comes from the other folds alone."""
    flags = bench_module("quality_flags.py", "quality_flags_bench")
    rng = np.random.default_rng(0)
    documents = []
    for fold in range(3):
        per_case, measures, folds = {}, {}, {}
        for i in range(10):
            name = f"case{fold}_{i}"
            failed = i < 2  # two failures per fold, with a low task agreement
            per_case[name] = {"WT": {"dice": 0.4 if failed else 0.85}}
            measures[name] = {
                "task_agreement": float(rng.uniform(0.5, 0.7) if failed else rng.uniform(0.8, 1)),
                "rim_fraction": float(rng.uniform(0, 0.3)),  # no signal
                "wt_ml": 50.0,
                "tc_ml": 20.0,
            }
            folds[name] = f"fold{fold}"
        document = {
            "folds": folds,
            "results": {"oof/x": {"per_case": per_case, "flags": {}, "quality_measures": measures}},
        }
        path = tmp_path / f"f{fold}.json"
        path.write_text(json.dumps(document))
        documents.append(path)
    cases = flags.load(documents, "oof/x")
    assert cases["case0_0"]["measures"]["tc_ratio"] == pytest.approx(0.4)
    everything = list(cases.values())
    rule = flags.choose(everything, 0.70, 0.10)
    assert [t.measure for t in rule] == ["task_agreement"] and not rule[0].above
    assert flags.score(rule, everything, 0.70) == (6, 6, 0, 24)
    # Chosen without fold 0, the threshold lies between the other folds' values only.
    rest = [c for c in everything if c["fold"] != "fold0"]
    threshold = flags.choose(rest, 0.70, 0.10)[0].threshold
    top_bad = max(c["measures"]["task_agreement"] for c in rest if c["wt"] < 0.7)
    low_good = min(c["measures"]["task_agreement"] for c in rest if c["wt"] >= 0.7)
    assert threshold == pytest.approx((top_bad + low_good) / 2)
    # Restricted to a measure without signal, the rule uses that measure or nothing, and
    # catches fewer failures than the measure it was not allowed.
    restricted = flags.choose(everything, 0.70, 0.10, max_tests=2, measures=("rim_fraction",))
    assert all(t.measure == "rim_fraction" for t in restricted)
    assert flags.score(restricted, everything, 0.70)[0] < 6
    nested = flags.nested_folds(cases, 0.70, 0.10, max_tests=1, measures=("task_agreement",))
    assert all(t.measure == "task_agreement" for rule, _ in nested.values() for t in rule)


def test_paired_comparison_counts_wins_and_leaves_out_unscored_regions(tmp_path):
    """bench/compare.py: the paired difference is second minus first over the shared
    cases; a region one side could not score is left out of that region only."""
    compare = bench_module("compare.py", "compare_bench")

    def result(dice: dict[str, tuple[float | None, float, float]]) -> dict:
        return {
            "per_case": {
                case: {r: {"dice": d} for r, d in zip(("WT", "TC", "ET"), values, strict=True)}
                for case, values in dice.items()
            }
        }

    first = result({"a": (0.8, 0.5, 0.5), "b": (0.6, 0.5, 0.5), "c": (0.9, 0.2, 0.5)})
    second = result({"a": (0.9, 0.5, 0.5), "b": (None, 0.5, 0.5), "d": (0.1, 0.1, 0.1)})
    out = compare.paired(first, second)
    assert out["cases"] == ["a", "b"]
    assert out["WT"]["cases"] == ["a"] and out["WT"]["mean_difference"] == pytest.approx(0.1)
    assert (out["WT"]["second_wins"], out["WT"]["first_wins"]) == (1, 0)
    assert out["TC"]["mean_difference"] == 0.0 and out["TC"]["worst"] == (0.5, 0.5)
    document = tmp_path / "one.json"
    document.write_text(json.dumps({"results": {"m/wide": first, "m/fast": first}}))
    with pytest.raises(SystemExit, match="name one of"):
        compare.pick(str(document), None)
    assert compare.pick(str(document), "fast")[0] == "m/fast"
    assert compare.pick(f"{document}:m/wide", None)[0] == "m/wide"
    assert compare.paired(first, second, only={"a", "c"})["cases"] == ["a"]


def test_paired_comparison_of_two_settings_of_some_folds(tmp_path, capsys):
    compare = bench_module("compare.py", "compare_bench")

    def result(wt: dict[str, float]) -> dict:
        return {
            "per_case": {c: {r: {"dice": d} for r in ("WT", "TC", "ET")} for c, d in wt.items()}
        }

    document = tmp_path / "all.json"
    plain = result({"a": 0.8, "b": 0.6, "c": 0.9})
    better = result({"a": 0.9, "b": 0.7, "c": 0.1})
    folds = {"a": "fold0", "b": "fold1", "c": "fold3"}
    document.write_text(json.dumps({"folds": folds, "results": {"m/x": plain, "m/y": better}}))
    assert compare.main([f"{document}:m/x", f"{document}:m/y", "--folds", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 cases; second minus first" in out and "WT: mean +0.100" in out
    with pytest.raises(SystemExit, match="no case in folds 4"):
        compare.main([f"{document}:m/x", f"{document}:m/y", "--folds", "4"])


def test_calibration_chooses_each_folds_lines_on_the_other_folds_alone():
    """bench/calibration.py: a fold's cases get the setting that scores best on the other
    folds, even when another setting would score better on the fold itself."""
    calibration = bench_module("calibration.py", "calibration_bench")

    def scores(values: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
        return {n: {r: {"dice": v} for r in ("WT", "TC", "ET")} for n, v in values.items()}

    folds = {"a": "fold0", "b": "fold0", "c": "fold1", "d": "fold2"}
    by_setting = {
        "default": scores({"a": 0.5, "b": 0.5, "c": 0.6, "d": 0.6}),
        "low": scores({"a": 0.9, "b": 0.9, "c": 0.5, "d": 0.5}),  # best on fold0 alone
        "high": scores({"a": 0.4, "b": 0.4, "c": 0.7, "d": 0.7}),
    }
    picked, chosen = calibration.nested(by_setting, folds)
    assert chosen == {"fold0": "high", "fold1": "low", "fold2": "low"}
    assert picked["a"] == by_setting["high"]["a"] and picked["c"] == by_setting["low"]["c"]
    names = list(calibration.combinations([0.4], [0.35, 0.5], [0.5]))
    assert names == ["default", "regions+wt40+core35+et50", "regions+wt40+core50+et50"]
    options = calibration.combinations([0.4], [0.35], [0.5])["regions+wt40+core35+et50"]
    assert options.fusion == "regions" and options.thresholds.core == 0.35
    # The baseline is the product's default; a named setting brings its own fusion.
    named = calibration.combinations([], [], [], ["wide+lesion+guard+mirror+noshell"])
    assert list(named) == ["default", "wide+lesion+guard+mirror+noshell"]
    assert named["default"] == SegmentationOptions()
    assert named["wide+lesion+guard+mirror+noshell"].fusion == "argmax"


def test_calibration_averages_several_stores_as_an_ensemble(tmp_path):
    """bench/calibration.py: probabilities stored by two models are averaged per task, and
    the first store's normalisation is the one the case is prepared with."""
    calibration = bench_module("calibration.py", "calibration_bench")
    fields = calibration.TaskProbabilities._fields
    stores = [tmp_path / "landmarks", tmp_path / "zscore"]
    for value, store, normalisation in zip(
        (0.2, 0.6), stores, ("landmarks", "zscore"), strict=True
    ):
        store.mkdir()
        np.savez_compressed(
            store / "case.npz",
            **{k: np.full((2, 3, 3, 3), value, dtype=np.float16) for k in fields},
            normalisation=np.array(normalisation),
        )
    probs, normalisation = calibration.stored_probabilities(stores, "case")
    assert normalisation == "landmarks"
    for k in fields:
        np.testing.assert_allclose(getattr(probs, k), 0.4, atol=1e-3)
    alone, _ = calibration.stored_probabilities(stores[1:], "case")
    np.testing.assert_allclose(alone.tumour, 0.6, atol=1e-3)
