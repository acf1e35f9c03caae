"""Accuracy of models on held-out cases, per institution group, through the real pipeline.

    python bench/accuracy.py --crossval bench/cv-runs --setting wide+lesion wide+largest wide+rm
    python bench/accuracy.py --crossval bench/cv-runs --folds 1 --setting ... --json f1.json
    python bench/accuracy.py --combine f0.json f1.json [--json all.json]
    python bench/accuracy.py \
        --model previous=model/weights/omnet_cga.pt --model new=runs/x/best.pt \
        [--model ensemble=a.pt+b.pt] \
        [--data ../shared/data/brats2018 ../shared/data/brats-extra] \
        [--split model/splits/multisite_val.txt] \
        [--setting wide+lesion paper+pp fast+pp paper+guard+tta ...] [--json out.json]

Every case goes through :func:`model.inference.case.process_case` (what ``omnet segment`` and
the workers run), once per model and setting. A setting names the tiling (``wide``, the
default, ``paper`` or ``fast``) followed by levers joined with ``+``: ``pp`` (the
paper's post-processing), ``guard`` (post-processing with the guarded edema
relabelling), ``rm`` (small-component removal only, no edema relabelling), ``lesion``
(small-component removal and the tumour parts more than 10 mm from the main lesion
removed: ``--postprocess main-lesion``), ``largest`` (the same with the earlier main
lesion, the largest component, and no component spared), ``tta`` (flip averaging over
all eight mirrorings), ``mirror`` (the same over the left-right mirror only),
``mixed`` (autocast: bfloat16 on the CPU, float16 on CUDA) or ``fp32`` (no autocast; the
default is the product's ``auto`` precision), ``regions`` (task 2 decided region by
region, :data:`model.defaults.FusionRule`; without it or ``joint``, the paper's arg-max
class, which the documents before ``joint`` measured), ``joint`` (the same with the
whole tumour voted by task 1 and task 2 together; the product's default fusion),
``noshell`` (with ``lesion``: a shell along the brain's edge is not spared for its
confident core while a component that is not a shell holds confident core; the
product's default since the landmarks model; without it, the earlier rule that the
documents before it measured; ``wide+lesion+guard+mirror+noshell+joint`` is the default
inference), and ``wtNN``, ``coreNN``, ``etNN`` (the fusion's lines moved to 0.NN,
:class:`model.inference.fusion.RegionThresholds`: ``wt`` and ``core`` for the region
rule, ``et`` for both).
Prints Dice and HD95 (WT, TC, ET) per institution group (from the case name), the mean
over cases, the mean over groups (each institution weighs the same) and the CPU seconds
per case relative to the first model and setting, measured in this run.

Settings that share a model, tiling and TTA share one network pass per case (the
probabilities are kept for the next setting); the CPU time of a setting that reused
them counts only what it ran itself (fusion, post-processing, writing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.defaults import DEFAULT_PRECISION, MAIN_LESION_GAP_MM
from model.inference.case import CaseOutputs, process_case
from model.inference.fusion import RegionThresholds
from model.inference.pipeline import SegmentationOptions, load_predictor
from model.inference.tiling import LAYOUTS, Predictor, TaskProbabilities
from model.io.nifti.files import find_label_file
from model.io.nifti.read import load_case
from model.training.data import (
    SPLITS_DIR,
    find_cases_in,
    institution_group,
    read_split,
    resolve_data_dir,
)

REGIONS = ("WT", "TC", "ET")


class SharedPredictor:
    """A predictor that keeps its last result, so that settings differing only after
    the network (post-processing) do not run the network again on the same case."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.device = predictor.device
        self.normalisation = predictor.normalisation
        self.precision = predictor.precision
        self._key: str | None = None
        self._probs: TaskProbabilities | None = None

    def predict(
        self, images: np.ndarray, mask: np.ndarray | None = None, progress: Any = None
    ) -> TaskProbabilities:
        digest = hashlib.sha1(images.tobytes())
        if mask is not None:
            digest.update(np.packbits(mask).tobytes())
        key = digest.hexdigest()
        if key != self._key or self._probs is None:
            self._probs = self.predictor.predict(images, mask, progress)
            self._key = key
        return self._probs


#: The levers a setting may name after its tiling (see the module's docstring).
LEVERS = (
    "pp",
    "guard",
    "rm",
    "lesion",
    "largest",
    "tta",
    "mirror",
    "fp32",
    "mixed",
    "regions",
    "joint",
    "noshell",
)

#: A lever that moves one of the fusion's lines: ``wt40`` is whole tumour above 0.40.
THRESHOLD_LEVER = re.compile(r"(wt|core|et)(\d\d)")


@dataclass(frozen=True)
class Setting:
    name: str
    tiling: str
    options: SegmentationOptions
    tta: str  # a key of model.inference.tiling.TTA_PASSES
    precision: str = DEFAULT_PRECISION

    @classmethod
    def parse(cls, text: str) -> Setting:
        tiling, *levers = text.split("+")
        lines = {m[1]: int(m[2]) / 100 for m in map(THRESHOLD_LEVER.fullmatch, levers) if m}
        unknown = {lever for lever in levers if not THRESHOLD_LEVER.fullmatch(lever)}
        unknown -= set(LEVERS)
        if tiling not in LAYOUTS or unknown:
            raise SystemExit(
                f"setting {text!r}: want TILING[+LEVER...], TILING one of {', '.join(LAYOUTS)}, "
                f"LEVER one of {', '.join(LEVERS)} or wtNN, coreNN, etNN"
            )
        thresholds = RegionThresholds(
            whole=lines.get("wt", 0.5), core=lines.get("core", 0.5), enhancing=lines.get("et", 0.5)
        )
        relabel = "pp" in levers or "guard" in levers
        options = SegmentationOptions(
            remove_small=relabel or bool({"rm", "lesion", "largest"} & set(levers)),
            relabel_edema=relabel,
            relabel_guard="guard" in levers,
            main_lesion_gap_mm=MAIN_LESION_GAP_MM if {"lesion", "largest"} & set(levers) else None,
            main_lesion_guard="largest" not in levers,
            fusion="joint" if "joint" in levers else "regions" if "regions" in levers else "argmax",
            spare_shells="noshell" not in levers,
            thresholds=thresholds,
        )
        precision = "mixed" if "mixed" in levers else "float32" if "fp32" in levers else "auto"
        tta = "all" if "tta" in levers else "mirror" if "mirror" in levers else "off"
        return cls(text, tiling, options, tta, precision)


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and bool(np.isfinite(v))]
    return float(np.mean(finite)) if finite else float("nan")


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean (resampling cases)."""
    finite = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(finite) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.choice(finite, size=(BOOTSTRAP_RESAMPLES, len(finite)), replace=True)
    low, high = np.percentile(draws.mean(axis=1), [2.5, 97.5])
    return (float(low), float(high))


def summarise(
    per_case: dict[str, dict[str, dict[str, float | None]]], folds: dict[str, str] | None = None
) -> dict[str, Any]:
    """Dice and HD95 means per group, over cases and over group means; for Dice over
    cases also the median, the worst case and a bootstrap interval of the mean; the
    number of cases of each group; and with ``folds`` (case -> fold) the means per fold."""
    groups: dict[str, list[str]] = {}
    for name in per_case:
        groups.setdefault(institution_group(name), []).append(name)
    by_fold: dict[str, list[str]] = {}
    for name in per_case:
        if folds and name in folds:
            by_fold.setdefault(folds[name], []).append(name)

    def means(names: list[str]) -> dict[str, dict[str, float]]:
        return {
            r: {m: _mean([per_case[n][r][m] for n in names]) for m in ("dice", "hd95")}
            for r in REGIONS
        }

    def spread(names: list[str]) -> dict[str, dict[str, Any]]:
        out = {}
        for r in REGIONS:
            dice = [float(per_case[n][r]["dice"] or 0.0) for n in names]
            worst = names[int(np.argmin(dice))]
            out[r] = {
                "median": float(np.median(dice)),
                "worst": float(min(dice)),
                "worst_case": worst,
                "ci95": bootstrap_interval(dice),
            }
        return out

    by_group = {g: means(names) for g, names in sorted(groups.items())}
    macro = {
        r: {m: _mean([by_group[g][r][m] for g in by_group]) for m in ("dice", "hd95")}
        for r in REGIONS
    }
    return {
        "groups": by_group,
        "group_sizes": {g: len(names) for g, names in sorted(groups.items())},
        "fold_means": {f: means(names) for f, names in sorted(by_fold.items())},
        "group_spread": {g: spread(names) for g, names in sorted(groups.items())},
        "mean": means(list(per_case)),
        "spread": spread(list(per_case)),
        "group_mean": macro,
    }


def flag_table(
    per_case: dict[str, dict[str, dict[str, float | None]]],
    flags: dict[str, list[str]],
    threshold: float = 0.70,
) -> dict[str, Any]:
    """How the quality flag separates failures (WT Dice below ``threshold``) from the rest."""
    bad = [n for n in per_case if float(per_case[n]["WT"]["dice"] or 0.0) < threshold]
    good = [n for n in per_case if n not in bad]
    return {
        "threshold": threshold,
        "failures": len(bad),
        "failures_flagged": sum(bool(flags.get(n)) for n in bad),
        "others": len(good),
        "others_flagged": sum(bool(flags.get(n)) for n in good),
        "flagged": {n: flags[n] for n in per_case if flags.get(n)},
    }


def _row(label: str, scores: dict[str, dict[str, float]], n: int | str) -> str:
    dice = " ".join(f"{scores[r]['dice']:.3f}" for r in REGIONS)
    hd = " ".join(f"{scores[r]['hd95']:6.1f}" for r in REGIONS)
    return f"  {label:<12} n={n!s:<3} Dice {dice}   HD95 {hd}"


def _spread_row(spread: dict[str, dict[str, Any]]) -> str:
    median = " ".join(f"{spread[r]['median']:.3f}" for r in REGIONS)
    worst = " ".join(f"{spread[r]['worst']:.3f}" for r in REGIONS)
    ci = " ".join(f"[{spread[r]['ci95'][0]:.3f}, {spread[r]['ci95'][1]:.3f}]" for r in REGIONS)
    return f"  {'':<12}       median {median}   worst {worst}   95% CI {ci}"


def crossval_models(runs: Path, checkpoint: str, only: list[int] | None = None) -> dict[str, str]:
    """Case name -> the checkpoint of the fold model that never trained on it (folds
    of ``model/splits/cv5_fold*_val.txt`` whose run finished, marked by its ``done``
    file, and holds ``checkpoint``; a fold still training is left out; ``only``: these
    fold numbers alone)."""
    out = {}
    for fold_file in sorted(SPLITS_DIR.glob("cv5_fold*_val.txt")):
        fold = fold_file.name.split("_")[1]  # 'fold3'
        if only is not None and int(fold.removeprefix("fold")) not in only:
            continue
        path = runs / fold / checkpoint
        if path.is_file() and (runs / fold / "done").is_file():
            out.update({name: str(path) for name in read_split(fold_file)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CKPT[+CKPT...]")
    parser.add_argument(
        "--crossval",
        type=Path,
        metavar="RUNS",
        help="out of fold: every case of the cv5 folds scored by the fold model of RUNS "
        "(bench/crossval.py train) that never trained on it (model name 'oof')",
    )
    parser.add_argument("--crossval-checkpoint", default="last.pt")
    parser.add_argument(
        "--folds", nargs="+", type=int, help="with --crossval: these folds only (e.g. 1)"
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="print the merged tables of earlier --json documents (one per fold, say); "
        "nothing is run",
    )
    data_dir = resolve_data_dir(os.environ.get("OMNET_DATA_DIR"))
    parser.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[data_dir / "brats2018", data_dir / "brats-extra"],
    )
    parser.add_argument("--split", type=Path, default=SPLITS_DIR / "multisite_val.txt")
    parser.add_argument(
        "--cases", nargs="+", metavar="NAME", help="only these cases (of the split or folds)"
    )
    parser.add_argument("--setting", nargs="+", default=["wide+lesion"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.combine:
        document = combine(args.combine)
        if args.json:
            args.json.write_text(json.dumps(document, indent=1, default=float))
        return

    # model name -> case name -> checkpoint path(s) ('+'-joined)
    folders = find_cases_in(args.data)
    if args.crossval:
        oof = crossval_models(args.crossval, args.crossval_checkpoint, args.folds)
        if not oof:
            raise SystemExit(f"no fold run under {args.crossval} holds {args.crossval_checkpoint}")
        names = sorted(oof)
        models: dict[str, dict[str, str]] = {"oof": oof}
    else:
        names = read_split(args.split)
        models = {}
    if args.cases:
        unknown = sorted(set(args.cases) - set(names))
        if unknown:
            raise SystemExit(f"--cases: not among the cases to score: {unknown}")
        names = [n for n in names if n in args.cases]
    for item in args.model:
        model_name, paths = item.split("=", 1)
        models[model_name] = {n: paths for n in names}
    if not models:
        raise SystemExit("give --model NAME=CKPT or --crossval RUNS")
    settings = [Setting.parse(s) for s in args.setting]
    missing = [n for n in names if n not in folders]
    if missing:
        raise SystemExit(f"cases not found under {args.data}: {missing}")

    shared: dict[tuple[str, str, bool, str], SharedPredictor] = {}

    def predictor(model_name: str, setting: Setting, case_name: str) -> SharedPredictor:
        paths = models[model_name][case_name]
        key = (paths, setting.tiling, setting.tta, setting.precision)
        if key not in shared:
            loaded = load_predictor(
                paths.split("+"),
                args.device,
                layout=LAYOUTS[setting.tiling],
                tta=setting.tta,
                precision=setting.precision,
            )
            shared[key] = SharedPredictor(loaded[0])
        return shared[key]

    keys = [(m, s.name) for m in models for s in settings]
    per_case: dict[tuple[str, str], dict[str, dict[str, dict[str, float | None]]]] = {}
    flags: dict[tuple[str, str], dict[str, list[str]]] = {key: {} for key in keys}
    measures: dict[tuple[str, str], dict[str, dict[str, float]]] = {key: {} for key in keys}
    seconds: dict[tuple[str, str], float] = {key: 0.0 for key in keys}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            case = load_case(folders[name])
            reference = find_label_file(folders[name])
            for model_name, setting_name in keys:
                setting = next(s for s in settings if s.name == setting_name)
                start = time.process_time()
                report = process_case(
                    case,
                    predictor(model_name, setting, name),  # type: ignore[arg-type]
                    CaseOutputs(Path(tmp) / f"{name}_seg.nii.gz"),
                    setting.options,
                    reference=reference,
                )
                seconds[(model_name, setting_name)] += time.process_time() - start
                assert report.evaluation is not None
                scores = {r: m.to_dict() for r, m in report.evaluation.items()}
                per_case.setdefault((model_name, setting_name), {})[name] = scores
                flags[(model_name, setting_name)][name] = list(report.quality.get("flags", []))
                measures[(model_name, setting_name)][name] = dict(
                    report.quality.get("measures", {})
                )
                dice = " ".join(f"{r} {scores[r]['dice']:.3f}" for r in REGIONS)
                flagged = ",".join(flags[(model_name, setting_name)][name]) or "-"
                print(
                    f"{name:<24} {model_name:<10} {setting_name:<18} Dice {dice}  flags {flagged}",
                    flush=True,
                )

    results = {
        f"{m}/{s}": {
            "per_case": per_case[(m, s)],
            "flags": flags[(m, s)],
            "quality_measures": measures[(m, s)],
            "cpu_seconds": seconds[(m, s)],
        }
        for m, s in keys
    }
    document = print_tables(results, fold_of(names) if args.crossval else {})
    document["models"] = models
    if args.json:
        args.json.write_text(json.dumps(document, indent=1, default=float))


def fold_of(names: list[str]) -> dict[str, str]:
    """Case name -> its cross-validation fold ('fold3'), for the names in a fold file."""
    out = {}
    for fold_file in sorted(SPLITS_DIR.glob("cv5_fold*_val.txt")):
        fold = fold_file.name.split("_")[1]
        out.update({n: fold for n in read_split(fold_file) if n in names})
    return out


def print_tables(results: dict[str, dict[str, Any]], folds: dict[str, str]) -> dict[str, Any]:
    """Prints the table of each result (``model/setting`` -> per-case scores, flags and
    CPU seconds): a row per fold (when ``folds`` names them) and per institution group,
    the mean, median, worst case and interval, the group mean and the quality flag's
    catch; returns them as a document (what ``--json`` writes, what ``--combine`` reads)."""
    first = next(iter(results.values()))
    base = first["cpu_seconds"] / max(len(first["per_case"]), 1)
    document: dict[str, Any] = {"cases": sorted(first["per_case"]), "folds": folds, "results": {}}
    print()
    for key, result in results.items():
        cases = result["per_case"]
        summary = summarise(cases, folds)
        cpu = result["cpu_seconds"] / len(cases)
        print(f"{key.replace('/', ' / ')}: {cpu:.1f} CPU s per case ({cpu / base:.2f} x)")
        for fold, scores in summary["fold_means"].items():
            print(_row(fold, scores, sum(folds.get(n) == fold for n in cases)))
        for group, scores in summary["groups"].items():
            print(_row(group, scores, summary["group_sizes"][group]))
        print(_row("mean", summary["mean"], len(cases)))
        print(_spread_row(summary["spread"]))
        print(_row("group mean", summary["group_mean"], len(summary["groups"])))
        table = flag_table(cases, result["flags"])
        print(
            f"  quality flag: {table['failures_flagged']} of {table['failures']} cases below "
            f"WT {table['threshold']} flagged, {table['others_flagged']} of {table['others']} "
            "others flagged"
        )
        document["results"][key] = {
            **summary,
            "quality_flag": table,
            "cpu_seconds_per_case": cpu,
            "cpu_seconds": result["cpu_seconds"],
            "per_case": cases,
            "flags": result["flags"],
            "quality_measures": result.get("quality_measures", {}),
        }
    return document


def combine(paths: list[Path]) -> dict[str, Any]:
    """The results of several ``--json`` documents (of disjoint cases: one per fold, say)
    merged per model and setting: per-case scores, flags and CPU seconds added up.
    A setting missing from a document is left out of the merged table."""
    documents = [json.loads(p.read_text()) for p in paths]
    keys = [k for k in documents[0]["results"] if all(k in d["results"] for d in documents)]
    merged: dict[str, dict[str, Any]] = {}
    folds: dict[str, str] = {}
    for document in documents:
        folds.update(document.get("folds", {}))
        for key in keys:
            result = document["results"][key]
            into = merged.setdefault(
                key, {"per_case": {}, "flags": {}, "quality_measures": {}, "cpu_seconds": 0.0}
            )
            overlap = set(into["per_case"]) & set(result["per_case"])
            if overlap:
                raise SystemExit(f"{key}: cases scored in two documents: {sorted(overlap)}")
            into["per_case"].update(result["per_case"])
            into["flags"].update(result.get("flags", result["quality_flag"]["flagged"]))
            into["quality_measures"].update(result.get("quality_measures", {}))
            into["cpu_seconds"] += result.get(
                "cpu_seconds", result["cpu_seconds_per_case"] * len(result["per_case"])
            )
    return print_tables(merged, folds)


if __name__ == "__main__":
    main()
