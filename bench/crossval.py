"""Cross-validation over all real cases, folds stratified by institution group.

    python bench/crossval.py folds                 # writes model/splits/cv5_fold*_val.txt
    python bench/crossval.py train [--runs bench/cv-runs] [--folds 0 1] [--max-minutes 150]
    python bench/crossval.py status [--runs bench/cv-runs]

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


def fold_file(fold: int) -> Path:
    return SPLITS_DIR / f"cv{FOLDS}_fold{fold}_val.txt"


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


def cmd_train(args: argparse.Namespace) -> int:
    folders = data_folders()
    runs: Path = args.runs
    runs.mkdir(parents=True, exist_ok=True)
    cache: Path = args.cache
    for k in args.folds:
        run_dir = runs / f"fold{k}"
        if (run_dir / "done").exists():
            print(f"fold {k}: finished", file=sys.stderr)
            continue
        base = [sys.executable, "-m", "service.cli", "train"]
        if (run_dir / "state.pt").exists():
            command = [*base, "--resume", str(run_dir)]
        else:
            if run_dir.exists():  # stopped before its first save: start again
                for f in run_dir.iterdir():
                    f.unlink()
            command = [
                *base,
                "--data", *map(str, folders),
                "--out", str(run_dir),
                "--cache", str(cache),
                "--val-split", str(fold_file(k)),
                "--seed", str(k),
                *RECIPE,
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
    for k in range(FOLDS):
        run_dir = args.runs / f"fold{k}"
        print(json.dumps({"fold": k, **fold_state(run_dir)}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("folds", help="write the fold files")
    train = sub.add_parser("train", help="train (or resume) the fold models")
    train.add_argument("--runs", type=Path, default=RUNS)
    train.add_argument("--cache", type=Path, default=ROOT / "runs" / "cv" / "cache")
    train.add_argument("--folds", type=int, nargs="+", default=list(range(FOLDS)))
    train.add_argument("--max-minutes", type=float, help="stop each run (resumably) after this")
    status = sub.add_parser("status", help="progress of the fold runs")
    status.add_argument("--runs", type=Path, default=RUNS)
    args = parser.parse_args()
    return {"folds": cmd_folds, "train": cmd_train, "status": cmd_status}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
