"""``omnet train``: curriculum training from folders of BraTS cases, resumable."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.defaults import (
    DEFAULT_NORMALISATION,
    DEFAULT_TILING,
    LOSSES,
    NORMALISATIONS,
    TILING_NAMES,
)
from service.cli.common import tiling_name

if TYPE_CHECKING:
    import numpy as np

    from model.io.volumes import Case
    from model.training.augment import AugmentConfig
    from model.training.config import TrainConfig
    from model.training.data import CachedCase
    from model.training.trainer import Trainer

logger = logging.getLogger(__name__)

NAME = "train"
HELP = "train OM-Net on folders of BraTS cases (resumable)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="folder(s) of BraTS case folders (with _seg labels); a case name may appear once",
    )
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
    p.add_argument(
        "--val-tiling",
        default=DEFAULT_TILING,
        type=tiling_name,
        choices=TILING_NAMES,
        metavar="NAME",
        help=f"tiling of the validation passes: {', '.join(TILING_NAMES)} (default "
        "%(default)s, as omnet segment)",
    )
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and last)")
    p.add_argument(
        "--task1-tumour-fraction",
        type=float,
        default=0.0,
        help="share of task-1 patches centred in the dilated tumour (0 = the paper)",
    )
    p.add_argument(
        "--augment",
        nargs="?",
        const="default",
        choices=("default", "site"),
        help="patch augmentation (none in the paper): 'default' (the bare flag): flips, "
        "intensity, gamma, noise, blur; 'site': that plus bias fields, low resolution and "
        "wider intensity ranges, imitating other scanners",
    )
    p.add_argument(
        "--normalisation",
        default=DEFAULT_NORMALISATION,
        choices=NORMALISATIONS,
        metavar="NAME",
        help=f"intensity normalisation in the brain: {', '.join(NORMALISATIONS)} (default "
        "%(default)s, the paper's; 'clipped': z-score after clipping to the 0.5th-99.5th "
        "percentiles; 'landmarks': histogram standardisation); the checkpoints name it and "
        "inference follows it",
    )
    p.add_argument(
        "--loss",
        default=LOSSES[0],
        choices=LOSSES,
        help="per-task loss: 'cross-entropy' (default, the paper's) or 'cross-entropy+dice' "
        "(adds one minus a soft Dice over the regions the product reads from each task)",
    )
    p.add_argument("--init", type=Path, help="start from this checkpoint's weights")
    p.add_argument(
        "--device",
        default=None,
        help="auto (default), cpu, cuda or cuda:N; with --resume, default: the run's device",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between saves")
    p.add_argument("--max-minutes", type=float, help="stop (resumably) after this long")


def _new_run(args: argparse.Namespace) -> dict:
    from model.training.config import TrainConfig
    from model.training.data import find_cases_in, read_split
    from model.training.splits import split_cases

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
        augment=args.augment is not None,
        augment_preset=args.augment or "default",
        normalisation=args.normalisation,
        loss=args.loss,
        init_checkpoint=str(args.init.resolve()) if args.init else None,
    )
    cases = list(find_cases_in(args.data).values())
    if not cases:
        folders = " ".join(str(d) for d in args.data)
        raise ValueError(f"no case folders with all four modalities under {folders}")
    train, val = split_cases(
        cases,
        read_split(args.val_split) if args.val_split else None,
        read_split(args.train_split) if args.train_split else None,
    )
    run = {
        "config": config.to_dict(),
        "data": [str(d.resolve()) for d in args.data],
        "case_dirs": {p.name: str(p.resolve()) for p in [*train, *val]},
        "cache": str((args.cache or args.out.parent / "cache").resolve()),
        "train_cases": [p.name for p in train],
        "val_cases": [p.name for p in val],
        "device": args.device or "auto",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run.json").write_text(json.dumps(run, indent=1))
    return run


def _case_dirs(run_info: dict) -> dict[str, Path]:
    """Case name -> folder of a run; runs made before several folders name one folder."""
    if "case_dirs" in run_info:
        return {n: Path(p) for n, p in run_info["case_dirs"].items()}
    folder = Path(run_info["data"])
    return {n: folder / n for n in [*run_info["train_cases"], *run_info["val_cases"]]}


def _open_run(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The run folder and its run.json: an existing run (--resume) or a new one."""
    if not args.resume:
        return args.out, _new_run(args)
    run_dir = args.resume
    if not (run_dir / "run.json").is_file():
        raise ValueError(f"{run_dir} holds no run (no run.json); start one with --data/--out")
    return run_dir, json.loads((run_dir / "run.json").read_text())


def _training_cases(run_info: dict[str, Any], case_dirs: dict[str, Path]) -> list[CachedCase]:
    """The training cases, cached (once) and memory-mapped, with a progress bar."""
    from tqdm import tqdm

    from model.training.data import build_cache

    names = run_info["train_cases"]
    with tqdm(total=len(names), desc="caching cases", unit="case", file=sys.stderr) as bar:
        return build_cache(
            [case_dirs[n] for n in names],
            run_info["cache"],
            progress=lambda done, total, name: bar.update(1),
            normalisation=run_info["config"].get("normalisation", DEFAULT_NORMALISATION),
        )


def _validation_cases(
    run_info: dict[str, Any], case_dirs: dict[str, Path]
) -> list[tuple[Case, np.ndarray]]:
    """The validation cases with their reference label maps, in memory."""
    from model.io.nifti.files import find_label_file
    from model.io.nifti.read import load_case, load_labels

    validation = []
    for name in run_info["val_cases"]:
        case = load_case(case_dirs[name])
        label_file = find_label_file(case_dirs[name])
        if label_file is None:
            raise ValueError(f"validation case {name} has no label map (<case>_seg.nii.gz)")
        validation.append((case, load_labels(label_file, like=case)))
    return validation


def _fit(trainer: Trainer, run_dir: Path, max_minutes: float | None) -> int:
    """Trains with a progress bar until done or stopped; prints how it ended."""
    from tqdm import tqdm

    from model.training.config import TrainingInterruptedError

    config = trainer.config
    bar = tqdm(
        total=config.epochs * config.steps_per_epoch,
        initial=trainer.state.global_step,
        desc="training",
        unit="step",
        file=sys.stderr,
    )

    def progress(record: dict[str, Any]) -> None:
        bar.update(1)
        losses = {k[5:]: f"{v:.3f}" for k, v in record.items() if k.startswith("loss_")}
        bar.set_postfix({"ep": record["epoch"] + 1, **losses})

    started = time.monotonic()
    try:
        trainer.fit(max_seconds=max_minutes * 60 if max_minutes else None, progress=progress)
    except TrainingInterruptedError as stop:
        bar.close()
        print(
            f"stopped ({stop}) at step {trainer.state.global_step}; state saved. "
            f"Continue with: omnet train --resume {run_dir}",
            file=sys.stderr,
        )
        return 0 if str(stop) in ("time budget", "step budget") else 130
    bar.close()
    print(
        f"done: {trainer.state.global_step} steps in {(time.monotonic() - started) / 60:.1f} min; "
        f"best mean validation Dice {trainer.state.best_score:.3f} "
        f"(epoch {trainer.state.best_epoch + 1}); checkpoints in {run_dir}",
        file=sys.stderr,
    )
    return 0


def _augment_config(config: TrainConfig) -> AugmentConfig | None:
    from model.training.augment import AugmentConfig

    if not config.augment:
        return None
    return AugmentConfig.site_shift() if config.augment_preset == "site" else AugmentConfig()


def run(args: argparse.Namespace) -> int:
    from model.inference.tiling import resolve_device
    from model.training.config import TrainConfig
    from model.training.data import PatchSampler
    from model.training.trainer import Trainer

    run_dir, run_info = _open_run(args)
    config = TrainConfig.from_dict(run_info["config"])
    device = resolve_device(args.device or run_info["device"])
    case_dirs = _case_dirs(run_info)
    cases = _training_cases(run_info, case_dirs)
    sampler = PatchSampler(
        cases,
        config.batch_per_task,
        config.online_transfer,
        seed=config.seed,
        task1_tumour_fraction=config.task1_tumour_fraction,
        augment=_augment_config(config),
    )
    summary = {
        "folder": run_info["data"],
        "train_cases": len(cases),
        "val_cases": run_info["val_cases"],
    }
    trainer = Trainer(
        config, sampler, run_dir, _validation_cases(run_info, case_dirs), device, summary
    )
    if args.resume and (run_dir / "state.pt").exists():  # stopped before its first save
        trainer.load_state()
        print(
            f"resuming {run_dir} at epoch {trainer.state.epoch + 1}, "
            f"step {trainer.state.global_step}",
            file=sys.stderr,
        )
    return _fit(trainer, run_dir, args.max_minutes)
