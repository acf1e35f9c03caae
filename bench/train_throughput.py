"""Training throughput: patches per second per curriculum stage, for several widths.

    python bench/train_throughput.py [--widths 32 8] [--steps 3] [--data CASES_DIR]

Without --data, phantom cases (model.io.phantom) are cached into a temporary folder, so
anyone can run it; sampling reads the same memory-mapped cache either way. Each
figure is the median of --steps timed steps after one warm-up step, and the last
column is the speed relative to the first width, measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model.io.nifti.files import find_cases
from model.io.phantom import write_phantom
from model.training.config import TrainConfig
from model.training.data import PatchSampler, build_cache
from model.training.trainer import Trainer

STAGES = {
    "task 1": (True, False, False),
    "tasks 1+2": (True, True, False),
    "all": (True, True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-per-task", type=int, default=20)
    parser.add_argument("--variant", default="omnet_cga")
    parser.add_argument(
        "--data", type=Path, help="folder of BraTS case folders (default: phantoms)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            case_dirs = find_cases(args.data)[:4]
        else:
            case_dirs = [
                write_phantom(Path(tmp) / "cases", name=f"ph{i}", shape=(96, 96, 64), seed=i)[
                    "t1"
                ].parent
                for i in range(3)
            ]
        cases = build_cache(case_dirs, Path(tmp) / "cache")
        print(
            f"# {platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, "
            f"device {args.device}, variant {args.variant}, {args.batch_per_task} patches per task"
        )
        print(f"{'width':>6} {'stage':<10} {'s/step':>8} {'patches/s':>10} {'vs first':>9}")
        first: dict[str, float] = {}
        for width in args.widths:
            config = TrainConfig(
                variant=args.variant, width=width, batch_per_task=args.batch_per_task
            )
            sampler = PatchSampler(cases, args.batch_per_task, transfer=True, seed=0)
            trainer = Trainer(config, sampler, Path(tmp) / f"run{width}", device=args.device)
            for stage, active in STAGES.items():
                trainer.train_step(active)  # warm-up
                times, patches = [], []
                for _ in range(args.steps):
                    before = trainer.state.patches_seen
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    trainer.train_step(active)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                    patches.append(trainer.state.patches_seen - before)
                pps = sum(patches) / sum(times)
                first.setdefault(stage, pps)
                print(
                    f"{width:>6} {stage:<10} {statistics.median(times):>8.2f} {pps:>10.1f} "
                    f"{pps / first[stage]:>9.2f}"
                )


if __name__ == "__main__":
    main()
