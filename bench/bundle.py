"""Ships a finished training run as the bundled model, its model card in its metadata.

    python bench/bundle.py bench/final-runs/landmarks \
        [--crossval bench/cv-runs-landmarks] \
        [--oof bench/cv-runs-landmarks/oof/all-joint.json] \
        [--setting oof/wide+lesion+guard+mirror+noshell+joint] [--out model/weights/omnet_cga.pt]

The run (``bench/crossval.py train --study final``) trained on every case, so no case
can score it. Its expected accuracy on cases it never saw is what the cross-validation
measured for the same recipe: every case scored by the fold model that did not train on
it, with the default inference. This script refuses a run whose recipe differs from the
fold runs' (beyond the seed and how often it logged or validated), and a setting that is
not the product's default inference (tiling, test-time augmentation, post-processing),
and writes into the
checkpoint's ``bundled`` metadata, computed from the documents and never typed in:

- what it trained on (the run's cases, per institution group) and the recipe;
- the out-of-fold Dice and HD95: mean, median, worst case, 95 % bootstrap interval, per
  institution group and per fold;
- the quality flag's record (``task_disagreement``): its rule chosen fold by fold on the
  other folds from the measure it ships with (``bench/quality_flags.py``'s nested count).

The weights are the run's last (the fold models were scored at their last step too),
stored in half precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality_flags  # noqa: E402
from accuracy import REGIONS, Setting, summarise  # noqa: E402
from quality_flags import FAILURE_WT  # noqa: E402

from model.defaults import DEFAULT_POSTPROCESS, DEFAULT_TILING, DEFAULT_TTA  # noqa: E402
from model.inference.lesions import TASK_AGREEMENT, TASK_DISAGREEMENT  # noqa: E402
from model.inference.pipeline import SegmentationOptions  # noqa: E402
from model.net.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.training.config import TrainConfig  # noqa: E402
from model.training.data import institution_group  # noqa: E402
from model.weights import BUNDLED_PATH  # noqa: E402

#: The cross-validation of the bundled recipe (landmarks normalisation), and its
#: out-of-fold document and result of the default inference.
DEFAULT_CROSSVAL = ROOT / "bench" / "cv-runs-landmarks"
DEFAULT_OOF = DEFAULT_CROSSVAL / "oof" / "all-joint.json"
DEFAULT_SETTING = "oof/wide+lesion+guard+mirror+noshell+joint"

#: The measures the shipped quality rule is chosen from (its nested count in the card).
FLAG_MEASURES = ("task_agreement",)

#: Options of a run that do not change the model it trains.
NOT_RECIPE = ("seed", "checkpoint_every", "log_every", "val_every", "val_tiling")


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """A run's recipe: its configuration with the defaults filled in, less NOT_RECIPE."""
    full = dataclasses.asdict(TrainConfig(**config))
    full["stage_epochs"] = list(full["stage_epochs"])
    return {k: v for k, v in full.items() if k not in NOT_RECIPE}


def check_same_recipe(run: Path, config: dict[str, Any], crossval: Path) -> dict[str, Any]:
    """The recipe of ``run`` (its ``config``), once every fold run of ``crossval`` is
    found to share it."""
    mine = recipe(config)
    folds = sorted(crossval.glob("fold*/run.json"))
    if not folds:
        raise SystemExit(f"no fold runs under {crossval}; pass --crossval")
    for path in folds:
        theirs = recipe(json.loads(path.read_text())["config"])
        differ = {k: (theirs[k], mine[k]) for k in mine if theirs.get(k) != mine[k]}
        if differ:
            raise SystemExit(
                f"{run} was not trained with the recipe {path.parent} measured "
                f"(fold, run): {differ}; its out-of-fold accuracy would not be this model's"
            )
    return mine


def _round(x: float | None, digits: int = 3) -> float | None:
    """``x`` rounded; None where nothing could be scored (a region no case of a group
    holds), as NaN would not survive a comparison."""
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def expected_accuracy(document: dict[str, Any], setting: str) -> dict[str, Any]:
    """Out-of-fold Dice and HD95 of ``setting`` in an ``accuracy.py --combine`` document:
    over cases, per institution group and per fold."""
    if setting not in document["results"]:
        raise SystemExit(f"no {setting!r} in the document; it has {sorted(document['results'])}")
    per_case = document["results"][setting]["per_case"]
    summary = summarise(per_case, document["folds"])
    spread = summary["spread"]
    failures = [n for n in per_case if float(per_case[n]["WT"]["dice"] or 0.0) < FAILURE_WT]
    folds = Counter(document["folds"][n] for n in per_case)
    return {
        "cases": len(per_case),
        "dice_mean": {r: _round(summary["mean"][r]["dice"]) for r in REGIONS},
        "dice_median": {r: _round(spread[r]["median"]) for r in REGIONS},
        "dice_worst": {r: [_round(spread[r]["worst"]), spread[r]["worst_case"]] for r in REGIONS},
        "dice_ci95": {r: [_round(v) for v in spread[r]["ci95"]] for r in REGIONS},
        "hd95_mean_mm": {r: _round(summary["mean"][r]["hd95"], 1) for r in REGIONS},
        "dice_mean_of_group_means": {r: _round(summary["group_mean"][r]["dice"]) for r in REGIONS},
        "dice_by_group": {
            group: {"cases": summary["group_sizes"][group]}
            | {r: _round(scores[r]["dice"]) for r in REGIONS}
            for group, scores in summary["groups"].items()
        },
        "dice_by_fold": {
            fold: {"cases": folds[fold]} | {r: _round(scores[r]["dice"]) for r in REGIONS}
            for fold, scores in summary["fold_means"].items()
        },
        "dice_per_case_WT": {n: _round(per_case[n]["WT"]["dice"]) for n in sorted(per_case)},
        "cases_below_WT_0_70": sorted(failures),
    }


def flag_record(oof: Path, setting: str) -> dict[str, Any]:
    """The quality flag's nested cross-validation count on the out-of-fold results."""
    cases = quality_flags.load([oof], setting)
    folds = quality_flags.nested_folds(
        cases, FAILURE_WT, quality_flags.MAX_FALSE_ALARMS, max_tests=1, measures=FLAG_MEASURES
    )
    caught, failures, alarms, others = quality_flags.pooled(folds)
    return {
        "flag": TASK_DISAGREEMENT,
        "rule": f"overlap of task 1's and task 2's whole tumours below {TASK_AGREEMENT:g}",
        "failure": f"WT Dice below {FAILURE_WT:g}",
        "nested_cross_validation": {
            "failures_flagged": caught,
            "failures": failures,
            "others_flagged": alarms,
            "others": others,
        },
    }


def check_default_inference(setting: str) -> None:
    """Refuses an accuracy setting (``MODEL/SETTING``) that is not the default inference."""
    parsed = Setting.parse(setting.rpartition("/")[2])
    default = SegmentationOptions.for_postprocess(DEFAULT_POSTPROCESS)
    if (parsed.tiling, parsed.tta, parsed.options, parsed.precision) != (
        DEFAULT_TILING,
        DEFAULT_TTA,
        default,
        "auto",
    ):
        raise SystemExit(
            f"setting {setting!r} is not the default inference ({DEFAULT_TILING} tiling, "
            f"test-time augmentation {DEFAULT_TTA}, post-processing {DEFAULT_POSTPROCESS}, "
            f"fusion {default.fusion}, precision auto); the card states the accuracy of the "
            "default"
        )


def bundle(run: Path, crossval: Path, oof: Path, setting: str, out: Path) -> dict[str, Any]:
    """Writes the run's last weights to ``out`` with the model card; returns the card."""
    check_default_inference(setting)
    info = json.loads((run / "run.json").read_text())
    run_recipe = check_same_recipe(run, info["config"], crossval)
    if info.get("val_cases"):
        raise SystemExit(f"{run} held out {len(info['val_cases'])} cases; bundle a final run")
    ckpt = load_checkpoint(run / "last.pt")
    training = ckpt.metadata["training"]
    total = sum(run_recipe["stage_epochs"]) * run_recipe["steps_per_epoch"]
    if training["steps"] < total:
        raise SystemExit(f"{run} stopped at step {training['steps']} of {total}; resume it first")
    cases = sorted(info["train_cases"])
    groups = Counter(institution_group(name) for name in cases)
    document = json.loads(oof.read_text())
    params = sum(p.numel() for p in ckpt.model.parameters())
    card = {
        "trained_on": (
            f"all {len(cases)} real cases of ../shared/data (brats2018/ and brats-extra/): "
            + ", ".join(f"{g} {n}" for g, n in sorted(groups.items()))
        ),
        "training_cases": cases,
        "architecture": (
            f"OM-Net + CGA, width {ckpt.config.width} ({params / 1e6:.2f} M parameters)"
        ),
        "recipe": run_recipe,
        "training_steps": training["steps"],
        "default_inference": (
            f"{DEFAULT_TILING} tiling, test-time augmentation {DEFAULT_TTA}, "
            f"post-processing {DEFAULT_POSTPROCESS}"
        ),
        "expected_accuracy": {
            "how": (
                "out of fold: five folds stratified by institution, each case scored by the "
                "fold model (same recipe) that never trained on it, with the default inference"
            ),
            "crossval": _shown(crossval.resolve()),
            "document": _shown(oof.resolve()),
            "setting": setting,
            **expected_accuracy(document, setting),
        },
        "quality_flag": flag_record(oof, setting),
        "measured_with": f"python bench/bundle.py {_shown(run)}",
    }
    metadata = {"training": training, "bundled": card}
    save_checkpoint(out, ckpt.model, ckpt.config, metadata, half=True)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run of crossval.py --study final")
    parser.add_argument("--crossval", type=Path, default=DEFAULT_CROSSVAL)
    parser.add_argument("--oof", type=Path, default=DEFAULT_OOF)
    parser.add_argument("--setting", default=DEFAULT_SETTING)
    parser.add_argument("--out", type=Path, default=BUNDLED_PATH)
    args = parser.parse_args(argv)
    card = bundle(args.run.resolve(), args.crossval, args.oof, args.setting, args.out)
    accuracy = card["expected_accuracy"]
    print(f"wrote {args.out}: {card['architecture']}, trained on {card['trained_on']}")
    print(
        "expected Dice (out of fold, {cases} cases): mean {m}, median {md}".format(
            cases=accuracy["cases"],
            m=" / ".join(f"{accuracy['dice_mean'][r]:.3f}" for r in REGIONS),
            md=" / ".join(f"{accuracy['dice_median'][r]:.3f}" for r in REGIONS),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
