"""Per-case CPU time of omnet's inference against MONAI's BraTS SegResNet, in one run.

    pip install -e '.[bench]'       # monai, for this comparison only
    python bench/segresnet_speed.py [--case DIR] [--checkpoint CKPT ...] [--threads 2]
        [--setting wide+lesion+guard+mirror wide+lesion+guard ...] [--repeats 1]
        (a setting as bench/accuracy.py takes it: TILING[+pp|+guard|+rm|+lesion][+tta|+mirror])

The reference is MONAI's BraTS tutorial model (``bench/segresnet_reference.py``). omnet
runs the whole pipeline (:func:`model.inference.case.process_case`: pre-process, inference,
fusion, post-processing) with each given checkpoint (repeat ``--checkpoint`` to compare,
e.g., widths) and setting. Both run on the CPU with the same thread count, alternately,
and the script prints each one's wall and CPU seconds per case and omnet's time as a
ratio of SegResNet's. Both are timed from the loaded volumes to the label map
in memory: reading the files and writing the result are left out of both.
``bench/busy_host.py`` times whole processes instead, on a quiet and on a busy host.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accuracy import Setting
from segresnet_reference import segresnet, segresnet_regions

from model.inference.case import CaseOutputs, process_case
from model.inference.pipeline import load_predictor
from model.inference.tiling import LAYOUTS
from model.io.nifti.read import load_case
from model.training.data import resolve_data_dir
from model.weights import BUNDLED_PATH


def _segresnet_seconds(images: np.ndarray) -> tuple[float, float]:
    net = segresnet()
    wall, cpu = time.perf_counter(), time.process_time()
    segresnet_regions(net, images)
    return time.perf_counter() - wall, time.process_time() - cpu


def _omnet_seconds(
    case_dir: Path, checkpoint: Path, setting: str, out: Path
) -> tuple[float, float]:
    parsed = Setting.parse(setting)
    predictor, _ = load_predictor(
        [checkpoint],
        "cpu",
        layout=LAYOUTS[parsed.tiling],
        tta=parsed.tta,
        precision=parsed.precision,
    )
    options = parsed.options
    case = load_case(case_dir)  # reading the files is left out, as for SegResNet
    wall, cpu = time.perf_counter(), time.process_time()
    report = process_case(case, predictor, CaseOutputs(out / "seg.nii.gz"), options)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # Writing the label map is left out too (SegResNet's result stays in memory).
    write = report.timings_s.get("write", 0.0)
    return wall - write, cpu - write


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    default_case = (
        resolve_data_dir(os.environ.get("OMNET_DATA_DIR")) / "brats2018" / "Brats18_CBICA_AMH_1"
    )
    parser.add_argument("--case", type=Path, default=default_case)
    parser.add_argument(
        "--checkpoint", type=Path, action="append", help="repeatable (default: the bundled model)"
    )
    parser.add_argument(
        "--setting", nargs="+", default=["wide+lesion+guard+mirror", "wide+lesion+guard"]
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    checkpoints = args.checkpoint or [BUNDLED_PATH]
    torch.set_num_threads(args.threads)

    images = load_case(args.case).images
    print(f"case {args.case.name} {images.shape[1:]}, {args.threads} threads, CPU")
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            results.setdefault("segresnet", []).append(_segresnet_seconds(images))
            for checkpoint in checkpoints:
                for setting in args.setting:
                    seconds = _omnet_seconds(args.case, checkpoint, setting, Path(tmp))
                    label = f"omnet {setting}"
                    if len(checkpoints) > 1:
                        label = f"{label} {checkpoint.parent.name}/{checkpoint.name}"
                    results.setdefault(label, []).append(seconds)
    base_wall = float(np.median([w for w, _ in results["segresnet"]]))
    base_cpu = float(np.median([c for _, c in results["segresnet"]]))
    for name, runs in results.items():
        wall = float(np.median([w for w, _ in runs]))
        cpu = float(np.median([c for _, c in runs]))
        print(
            f"{name:<40} wall {wall:6.1f} s ({wall / base_wall:.2f} x SegResNet)   "
            f"CPU {cpu:6.1f} s ({cpu / base_cpu:.2f} x)"
        )


if __name__ == "__main__":
    main()
