"""Per-case CPU time of omnet's inference against MONAI's BraTS SegResNet, in one run.

    pip install -e '.[bench]'       # monai, for this comparison only
    python bench/segresnet_speed.py [--case DIR] [--checkpoint CKPT] [--threads 2]
        [--setting paper+pp ...] [--repeats 1]

The reference is MONAI's BraTS tutorial model: SegResNet(blocks_down=(1, 2, 2, 4),
blocks_up=(1, 1, 1), init_filters=16, in_channels=4, out_channels=3), 4.7 M
parameters, run with ``sliding_window_inference`` (roi 240 x 240 x 160, overlap 0.5,
sw_batch_size 1) on the case's four z-scored modalities; its weights are random
(speed does not depend on them). omnet runs the whole pipeline
(:func:`model.case.process_case`: load, pre-process, inference, fusion,
post-processing, write) with the given checkpoint and settings. Both run on the CPU
with the same thread count, alternately, and the script prints each one's wall and
CPU seconds per case and omnet's time as a ratio of SegResNet's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.case import CaseOutputs, process_case
from model.data import resolve_data_dir
from model.nifti_io import load_case
from model.pipeline import SegmentationOptions, load_predictor
from model.preprocess import brain_mask, zscore
from model.tiling import TILINGS
from model.weights import BUNDLED_PATH


def _segresnet_seconds(images: np.ndarray) -> tuple[float, float]:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SegResNet

    net = SegResNet(
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
        init_filters=16,
        in_channels=4,
        out_channels=3,
        dropout_prob=0.2,
    ).eval()
    x = torch.from_numpy(zscore(images, brain_mask(images)))[None]  # (1, 4, X, Y, Z)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = sliding_window_inference(x, (240, 240, 160), 1, net, overlap=0.5)
        assert isinstance(out, torch.Tensor)
        (torch.sigmoid(out) > 0.5).numpy()
    return time.perf_counter() - wall, time.process_time() - cpu


def _omnet_seconds(
    case_dir: Path, checkpoint: Path, setting: str, out: Path
) -> tuple[float, float]:
    tiling, *levers = setting.split("+")
    post = "pp" in levers or "guard" in levers
    options = SegmentationOptions(
        remove_small=post, relabel_edema=post, relabel_guard="guard" in levers
    )
    predictor, _ = load_predictor([checkpoint], "cpu", layout=TILINGS[tiling], tta="tta" in levers)
    wall, cpu = time.perf_counter(), time.process_time()
    process_case(case_dir, predictor, CaseOutputs(out / "seg.nii.gz"), options)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    default_case = (
        resolve_data_dir(os.environ.get("OMNET_DATA_DIR")) / "brats2018" / "Brats18_CBICA_AMH_1"
    )
    parser.add_argument("--case", type=Path, default=default_case)
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_PATH)
    parser.add_argument("--setting", nargs="+", default=["paper+pp"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images = load_case(args.case).images
    print(f"case {args.case.name} {images.shape[1:]}, {args.threads} threads, CPU")
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            results.setdefault("segresnet", []).append(_segresnet_seconds(images))
            for setting in args.setting:
                seconds = _omnet_seconds(args.case, args.checkpoint, setting, Path(tmp))
                results.setdefault(f"omnet {setting}", []).append(seconds)
    base_wall = float(np.median([w for w, _ in results["segresnet"]]))
    base_cpu = float(np.median([c for _, c in results["segresnet"]]))
    for name, runs in results.items():
        wall = float(np.median([w for w, _ in runs]))
        cpu = float(np.median([c for _, c in runs]))
        print(
            f"{name:<24} wall {wall:6.1f} s ({wall / base_wall:.2f} x SegResNet)   "
            f"CPU {cpu:6.1f} s ({cpu / base_cpu:.2f} x)"
        )


if __name__ == "__main__":
    main()
