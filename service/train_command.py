"""``omnet train``: curriculum training from a folder of BraTS cases, resumable."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="folder of BraTS case folders (with _seg labels)")
    p.add_argument("--out", type=Path, help="run folder: state, logs, checkpoints")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this folder")
    p.add_argument(
        "--variant",
        default="omnet_cga",
        help="omnet_cga (default), omnet, omnet_se, omnet_cga_minus, or mc_cascade (MC baseline)",
    )
    p.add_argument("--width", type=int, default=32, help="base width (32 in the paper)")
    p.add_argument(
        "--epochs",
        type=int,
        nargs=3,
        default=(1, 1, 18),
        metavar=("TASK1", "TASKS12", "ALL"),
        help="epochs of the three curriculum stages (paper: 1 1 18)",
    )
    p.add_argument("--steps-per-epoch", type=int, default=1000)
    p.add_argument("--batch-per-task", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-curriculum", action="store_true", help="all tasks from the start")
    p.add_argument("--no-transfer", action="store_true", help="no online data transfer")
    p.add_argument("--val-split", type=Path, help="file of validation case names")
    p.add_argument("--train-split", type=Path, help="file of training case names")
    p.add_argument("--cache", type=Path, help="cache folder (default: RUN/../cache)")
    p.add_argument("--val-tiling", default="paper", choices=["paper", "fast"])
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and last)")
    p.add_argument(
        "--task1-tumour-fraction",
        type=float,
        default=0.0,
        help="share of task-1 patches centred in the dilated tumour (0 = the paper)",
    )
    p.add_argument("--init", type=Path, help="start from this checkpoint's weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between saves")
    p.add_argument("--max-minutes", type=float, help="stop (resumably) after this long")


def _new_run(args: argparse.Namespace) -> dict:
    from model.data import read_split
    from model.nifti_io import find_cases
    from model.training import TrainConfig, split_cases

    if args.data is None or args.out is None:
        raise ValueError("a new run needs --data DIR and --out DIR (or --resume RUN)")
    if (args.out / "state.pt").exists():
        raise ValueError(f"{args.out} already holds a run; continue it with --resume {args.out}")
    config = TrainConfig(
        variant=args.variant,
        width=args.width,
        stage_epochs=tuple(args.epochs),
        curriculum=not args.no_curriculum,
        transfer=not args.no_transfer,
        steps_per_epoch=args.steps_per_epoch,
        batch_per_task=args.batch_per_task,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        val_tiling=args.val_tiling,
        val_every=args.val_every,
        task1_tumour_fraction=args.task1_tumour_fraction,
        init_checkpoint=str(args.init.resolve()) if args.init else None,
    )
    cases = find_cases(args.data)
    if not cases:
        raise ValueError(f"no case folders with all four modalities under {args.data}")
    train, val = split_cases(
        cases,
        read_split(args.val_split) if args.val_split else None,
        read_split(args.train_split) if args.train_split else None,
    )
    run = {
        "config": config.to_dict(),
        "data": str(args.data.resolve()),
        "cache": str((args.cache or args.out.parent / "cache").resolve()),
        "train_cases": [p.name for p in train],
        "val_cases": [p.name for p in val],
        "device": args.device,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run.json").write_text(json.dumps(run, indent=1))
    return run


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from model.data import PatchSampler, build_cache
    from model.nifti_io import find_label_file, load_case, load_labels
    from model.tiling import resolve_device
    from model.training import TrainConfig, Trainer, TrainingInterruptedError

    if args.resume:
        run_dir = args.resume
        if not (run_dir / "run.json").is_file():
            raise ValueError(f"{run_dir} holds no run (no run.json); start one with --data/--out")
        run_info = json.loads((run_dir / "run.json").read_text())
    else:
        run_dir = args.out
        run_info = _new_run(args)
    config = TrainConfig.from_dict(run_info["config"])
    device = resolve_device(args.device if args.resume is None else run_info["device"])
    data = Path(run_info["data"])

    bar = tqdm(
        total=len(run_info["train_cases"]), desc="caching cases", unit="case", file=sys.stderr
    )
    cases = build_cache(
        [data / n for n in run_info["train_cases"]],
        run_info["cache"],
        progress=lambda done, total, name: bar.update(1),
    )
    bar.close()
    validation = []
    for name in run_info["val_cases"]:
        case = load_case(data / name)
        label_file = find_label_file(data / name)
        if label_file is None:
            raise ValueError(f"validation case {name} has no label map (<case>_seg.nii.gz)")
        validation.append((case, load_labels(label_file, like=case)))

    sampler = PatchSampler(
        cases,
        config.batch_per_task,
        config.online_transfer,
        seed=config.seed,
        task1_tumour_fraction=config.task1_tumour_fraction,
    )
    summary = {
        "folder": run_info["data"],
        "train_cases": len(cases),
        "val_cases": run_info["val_cases"],
    }
    trainer = Trainer(config, sampler, run_dir, validation, device, summary)
    if args.resume and (run_dir / "state.pt").exists():  # stopped before its first save
        trainer.load_state()
        print(
            f"resuming {run_dir} at epoch {trainer.state.epoch + 1}, "
            f"step {trainer.state.global_step}",
            file=sys.stderr,
        )
    total = config.epochs * config.steps_per_epoch
    bar = tqdm(
        total=total,
        initial=trainer.state.global_step,
        desc="training",
        unit="step",
        file=sys.stderr,
    )

    def progress(record: dict) -> None:
        bar.update(1)
        bar.set_postfix(
            {
                "ep": record["epoch"] + 1,
                **{k[5:]: f"{v:.3f}" for k, v in record.items() if k.startswith("loss_")},
            }
        )

    started = time.monotonic()
    try:
        trainer.fit(
            max_seconds=args.max_minutes * 60 if args.max_minutes else None, progress=progress
        )
    except TrainingInterruptedError as stop:
        bar.close()
        print(
            f"stopped ({stop}) at step {trainer.state.global_step}; state saved. "
            f"Continue with: omnet train --resume {run_dir}",
            file=sys.stderr,
        )
        return 0 if str(stop) in ("time budget", "step budget") else 130
    bar.close()
    best = trainer.state.best_score
    print(
        f"done: {trainer.state.global_step} steps in {(time.monotonic() - started) / 60:.1f} min; "
        f"best mean validation Dice {best:.3f} (epoch {trainer.state.best_epoch + 1}); "
        f"checkpoints in {run_dir}",
        file=sys.stderr,
    )
    return 0
