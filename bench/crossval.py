"""Cross-validation over all real cases, folds stratified by institution group.

    python bench/crossval.py folds                 # writes model/splits/cv5_fold*_val.txt
    python bench/crossval.py train [--runs bench/cv-runs] [--folds 0 1] [--max-minutes 150]
    python bench/crossval.py status [--runs bench/cv-runs]
    python bench/crossval.py train --study sites --variant base landmarks ...
    python bench/crossval.py status --study sites

``folds`` deals the 34 cases of ``../shared/data/brats2018`` and ``brats-extra`` into
five folds: the cases of each institution group (the site in the case name) are shuffled
with a fixed seed and dealt in turn, groups one after another, so that every group is
spread over as many folds as it has cases and the folds differ in size by one at most.

``train`` trains one model per fold from scratch on the other four folds with one fixed
recipe (:data:`RECIPE`), through ``omnet train``; a stopped fold resumes where it
stopped (``--resume``), a finished one is skipped. The recipe has no checkpoint
selection: a fold's predictions come from its run's ``last.pt``, so the held-out cases
of a fold choose nothing (the run's validation passes on them are logged for the
learning curve only).

The fold runs live in ``bench/cv-runs/fold<k>/`` (``run.json``, ``train.jsonl``, the
training state and the weights), which the repository keeps, so that a run stopped on
one machine resumes on another; the patch cache is rebuilt where it is missing
(``runs/cv/cache`` by default, not kept). ``status`` prints each fold's progress.
Out-of-fold evaluation of inference settings runs through
``bench/accuracy.py --crossval RUNS`` (every case scored by the model that did not train
on it).

``--study sites`` measures recipe variants against site shift (:data:`VARIANTS`: the
recipe as it is, scanner-imitating augmentation, and the two normalisation variants):
each variant trains once on the CBICA cases and is scored on every case of the other
institutions (``model/splits/sites_val.txt``, written by ``folds``), none of which
trained any of them or chose anything: ``bench/accuracy.py --split
model/splits/sites_val.txt --model base=bench/site-runs/base/last.pt --model ...``.
The variants differ from :data:`RECIPE` in one option each, and train with the same
seed, steps and cases. ``--variant`` applies to the cross-validation too (runs in
``bench/cv-runs-<variant>``), for a variant worth five more runs.

``--study final --variant NAME`` trains the bundled model's candidate on all 34 cases
with the recipe the studies chose (``bench/final-runs/NAME``; no case is held out, so it
is never scored: its expected accuracy is the cross-validation's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.training.data import (  # noqa: E402
    DATA_ENV,
    SPLITS_DIR,
    find_cases_in,
    institution_group,
    read_split,
    resolve_data_dir,
)

FOLDS = 5
SEED = 2026
#: Where the fold runs are kept (in the repository: they resume on another machine).
RUNS = ROOT / "bench" / "cv-runs"
DATA_SETS = ("brats2018", "brats-extra")

#: The one training recipe of the fold models (width 8 as the bundled model; curriculum
#: 1 / 1 / 10 epochs of 150 steps, half of the task-1 patches centred in the dilated
#: tumour, patch augmentation). Fixed before any fold was scored.
RECIPE = (
    "--width", "8",
    "--epochs", "1", "1", "10",
    "--steps-per-epoch", "150",
    "--task1-tumour-fraction", "0.5",
    "--augment",
    "--val-every", "4",
    "--checkpoint-every", "50",
)  # fmt: skip

#: Recipe variants: the options each adds to :data:`RECIPE` (a later option wins over the
#: recipe's own). Against site shift, one option each; ``landmarks-long`` is the bundled
#: recipe (``landmarks``) trained for the paper's 1 / 1 / 18 epochs (3000 steps instead
#: of 1800), as the fold models' validation still rose at their last steps;
#: ``landmarks-dice`` is it with a soft Dice term added to each task's loss, as the fold
#: models under-segment (sensitivity below precision in every region).
VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "site-augment": ("--augment", "site"),
    "clipped": ("--normalisation", "clipped"),
    "landmarks": ("--normalisation", "landmarks"),
    "landmarks-long": ("--normalisation", "landmarks", "--epochs", "1", "1", "18"),
    "landmarks-dice": ("--normalisation", "landmarks", "--loss", "cross-entropy+dice"),
}
#: The institution group the site study trains on; every other group is held out.
SITE_TRAIN_GROUP = "CBICA"
SITE_RUNS = ROOT / "bench" / "site-runs"
FINAL_RUNS = ROOT / "bench" / "final-runs"


def fold_file(fold: int) -> Path:
    return SPLITS_DIR / f"cv{FOLDS}_fold{fold}_val.txt"


SITES_FILE = SPLITS_DIR / "sites_val.txt"
#: The final model's validation split: no case (every one trains it).
NO_CASES_FILE = SPLITS_DIR / "none_val.txt"


def site_split(case_names: list[str]) -> list[str]:
    """The cases the site study holds out: every institution group but
    :data:`SITE_TRAIN_GROUP`."""
    return sorted(n for n in case_names if institution_group(n) != SITE_TRAIN_GROUP)


def deal_folds(case_names: list[str], folds: int = FOLDS, seed: int = SEED) -> list[list[str]]:
    """Case names dealt into ``folds`` folds, stratified by institution group."""
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    for name in sorted(case_names):
        groups.setdefault(institution_group(name), []).append(name)
    dealt: list[list[str]] = [[] for _ in range(folds)]
    turn = 0
    for group in sorted(groups, key=lambda g: (len(groups[g]), g)):
        members = groups[group]
        rng.shuffle(members)
        for name in members:
            dealt[turn % folds].append(name)
            turn += 1
    return [sorted(f) for f in dealt]


def data_folders() -> list[Path]:
    root = resolve_data_dir(os.environ.get(DATA_ENV))
    return [root / name for name in DATA_SETS]


def read_folds() -> list[list[str]]:
    return [read_split(fold_file(k)) for k in range(FOLDS)]


def cmd_folds(_: argparse.Namespace) -> int:
    names = list(find_cases_in(data_folders()))
    for k, fold in enumerate(deal_folds(names)):
        groups = sorted({institution_group(n) for n in fold})
        header = (
            f"# Cross-validation fold {k} of {FOLDS} (held out), over the {len(names)} cases of\n"
            f"# ../shared/data/{{{','.join(DATA_SETS)}}}: made by `python bench/crossval.py "
            f"folds`\n# (institution groups dealt in turn, random.Random({SEED})). "
            f"Groups here: {', '.join(groups)}.\n"
        )
        fold_file(k).write_text(header + "".join(f"{n}\n" for n in fold))
        print(f"fold {k}: {len(fold)} cases, groups {groups}")
    held_out = site_split(names)
    groups = sorted({institution_group(n) for n in held_out})
    SITES_FILE.write_text(
        f"# Site study (held out): the {len(held_out)} of the {len(names)} cases of\n"
        f"# ../shared/data/{{{','.join(DATA_SETS)}}} from institutions other than "
        f"{SITE_TRAIN_GROUP}: made by\n# `python bench/crossval.py folds`. Groups: "
        f"{', '.join(groups)}.\n" + "".join(f"{n}\n" for n in held_out)
    )
    print(f"sites: {len(held_out)} held-out cases, groups {groups}")
    return 0


def fold_state(run_dir: Path) -> dict:
    """Progress of one fold's run: steps done, of how many, finished or not."""
    info: dict = {"run": str(run_dir), "started": (run_dir / "run.json").exists()}
    log = run_dir / "train.jsonl"
    if log.exists():
        steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        info["step"] = max((r.get("step", 0) for r in steps), default=0)
        vals = [r for r in steps if "validation" in r]
        if vals:
            last = vals[-1]
            dice = {k: round(v, 3) for k, v in last["validation"]["dice"].items()}
            info["last_validation"] = {"step": last["step"], "dice": dice}
    info["finished"] = (run_dir / "done").exists()
    return info


def _normalisation(options: tuple[str, ...]) -> str:
    return (
        options[options.index("--normalisation") + 1] if "--normalisation" in options else "zscore"
    )


def planned_runs(args: argparse.Namespace) -> list[tuple[str, Path, Path, int, tuple[str, ...]]]:
    """(label, run folder, held-out split, seed, options beyond the recipe) of every
    run the command names, in order."""
    out = []
    for variant in args.variant:
        extra = VARIANTS[variant]
        if args.study == "sites":
            out.append((f"sites {variant}", args.runs / variant, SITES_FILE, 0, extra))
            continue
        if args.study == "final":
            out.append((f"final {variant}", args.runs / variant, NO_CASES_FILE, 0, extra))
            continue
        runs = (
            args.runs if variant == "base" else args.runs.with_name(f"{args.runs.name}-{variant}")
        )
        for k in args.folds:
            label = f"fold {k}" if variant == "base" else f"{variant} fold {k}"
            out.append((label, runs / f"fold{k}", fold_file(k), k, extra))
    return out


def cmd_train(args: argparse.Namespace) -> int:
    folders = data_folders()
    for label, run_dir, split, seed, extra in planned_runs(args):
        if (run_dir / "done").exists():
            print(f"{label}: finished", file=sys.stderr)
            continue
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        base = [sys.executable, "-m", "service.cli", "train"]
        if (run_dir / "state.pt").exists():
            command = [*base, "--resume", str(run_dir)]
        else:
            if run_dir.exists():  # stopped before its first save: start again
                for f in run_dir.iterdir():
                    f.unlink()
            # One cache per normalisation: runs of different ones never rebuild each
            # other's entries.
            norm = _normalisation(extra)
            cache = (
                args.cache
                if norm == "zscore"
                else args.cache.with_name(f"{args.cache.name}-{norm}")
            )
            command = [
                *base,
                "--data", *map(str, folders),
                "--out", str(run_dir),
                "--cache", str(cache),
                "--val-split", str(split),
                "--seed", str(seed),
                *RECIPE,
                *extra,
            ]  # fmt: skip
        if args.max_minutes:
            command += ["--max-minutes", str(args.max_minutes)]
        print(" ".join(command), file=sys.stderr, flush=True)
        result = subprocess.run(command, cwd=ROOT)
        if result.returncode != 0:
            return result.returncode
        log = run_dir / "train.jsonl"
        config = json.loads((run_dir / "run.json").read_text())["config"]
        total = sum(config["stage_epochs"]) * config["steps_per_epoch"]
        last = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        steps = max((r.get("step", 0) for r in last), default=0)
        if steps >= total:
            (run_dir / "done").write_text("finished\n")
        else:
            return 0  # time budget spent: resume later
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    for label, run_dir, _split, _seed, _extra in planned_runs(args):
        print(json.dumps({"run_label": label, **fold_state(run_dir)}))
    return 0


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--study",
        choices=("cv", "sites", "final"),
        default="cv",
        help="cv: the five folds; sites: train on CBICA, hold out every other institution; "
        "final: train on every case, hold out none",
    )
    p.add_argument(
        "--runs", type=Path, help="default: bench/cv-runs, bench/site-runs or bench/final-runs"
    )
    p.add_argument("--folds", type=int, nargs="+", default=list(range(FOLDS)))
    p.add_argument(
        "--variant", nargs="+", choices=list(VARIANTS), default=["base"], help="recipe variants"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("folds", help="write the fold files and the site study's split")
    train = sub.add_parser("train", help="train (or resume) the fold models")
    _run_options(train)
    train.add_argument("--cache", type=Path, default=ROOT / "runs" / "cv" / "cache")
    train.add_argument("--max-minutes", type=float, help="stop each run (resumably) after this")
    status = sub.add_parser("status", help="progress of the runs")
    _run_options(status)
    args = parser.parse_args(argv)
    if args.command != "folds" and args.runs is None:
        args.runs = {"sites": SITE_RUNS, "final": FINAL_RUNS}.get(args.study, RUNS)
    return {"folds": cmd_folds, "train": cmd_train, "status": cmd_status}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
