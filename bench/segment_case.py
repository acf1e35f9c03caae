"""End-to-end time of segmenting one full-size case with several tilings ('paper' and 'wide').

    python bench/segment_case.py [CASE] [--width 32] [--checkpoint PATH] [--device auto]
                                 [--batch-size 16] [--tilings paper wide] [--json]

CASE is a BraTS case folder, by default the first one under
``$OMNET_DATA_DIR/brats2018`` (``OMNET_DATA_DIR`` defaults to ``../shared/data`` next
to the repository). Each tiling runs in its own fresh process, so that its peak
resident memory (``ru_maxrss``) is its own; a process loads the case, segments it
(pre-processing, inference, fusion, post-processing, paste back) and writes the label
map to a temporary folder. Prints seconds per stage, tiles run, peak memory and each
tiling's time over the first's (any named layout, the withdrawn ``fast`` included).

Without ``--checkpoint`` the network has random weights (seeded): tile counts,
inference and I/O times are those of a trained model, but the labels are meaningless
and post-processing time, which depends on the predicted tumour, is not representative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

STAGES = ("load", "preprocess", "inference", "fusion", "postprocess", "paste", "write")


def default_case() -> Path:
    """The first BraTS 2018 case folder under the data folder."""
    from model.training.data import DATA_ENV, resolve_data_dir

    root = resolve_data_dir(os.environ.get(DATA_ENV)) / "brats2018"
    cases = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not cases:
        sys.exit(f"no case folder under {root}; pass CASE or set {DATA_ENV}")
    return cases[0]


def run_tiling(
    case_dir: str,
    tiling: str,
    width: int,
    checkpoint: str | None,
    device: str,
    batch_size: int,
) -> dict[str, Any]:
    """Segments the case once with one tiling; runs in a child process of its own."""
    import numpy as np
    import torch

    from model.inference.pipeline import load_predictor, segment_case
    from model.inference.tiling import LAYOUTS, Predictor
    from model.io.nifti.read import load_case
    from model.io.nifti.write import save_labels
    from model.net.network import ArchConfig, build_model

    layout = LAYOUTS[tiling]
    if checkpoint:
        predictor, loaded = load_predictor([checkpoint], device, batch_size, layout)
        weights = f"{Path(checkpoint).name} (width {loaded[0].config.width})"
    else:
        torch.manual_seed(0)
        model = build_model(ArchConfig(width=width))
        predictor = Predictor([model], device, batch_size, layout)
        weights = f"random (width {width}, seed 0)"
    # Warm-up on one tile so that one-off start-up costs (CUDA context, kernel
    # selection, thread pools) are not counted as inference.
    warm = np.zeros((4, *layout.kept), dtype=np.float32)
    predictor.predict(warm, np.ones(layout.kept, dtype=bool))
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    tiles = 0

    def progress(done: int, total: int) -> None:
        nonlocal tiles
        tiles = total

    start = time.perf_counter()
    case = load_case(case_dir)
    timings = {"load": time.perf_counter() - start}
    seg = segment_case(case, predictor, progress=progress)
    timings.update(seg.timings)
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        save_labels(seg.labels, case, Path(tmp) / f"{case.name}_seg.nii.gz")
        timings["write"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start

    gpu_peak = (
        torch.cuda.max_memory_allocated() / 2**20 if predictor.device.type == "cuda" else None
    )
    return {
        "tiling": tiling,
        "case": case.name,
        "shape": list(case.shape),
        "patch": list(layout.patch),
        "kept": list(layout.kept),
        "tiles": tiles,
        "weights": weights,
        "device": str(predictor.device),
        "threads": torch.get_num_threads(),
        "timings_s": timings,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": gpu_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", help="BraTS case folder (default: first under data)")
    parser.add_argument("--width", type=int, default=32, help="width of the random network")
    parser.add_argument("--checkpoint", help="time a trained checkpoint instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tilings", nargs="+", default=["paper", "wide"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    case_dir = Path(args.case) if args.case else default_case()
    results = []
    for tiling in args.tilings:
        # A fresh process per tiling: peak memory must not carry over between runs.
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            results.append(
                pool.submit(
                    run_tiling,
                    str(case_dir),
                    tiling,
                    args.width,
                    args.checkpoint,
                    args.device,
                    args.batch_size,
                ).result()
            )
    base = results[0]["timings_s"]
    ratios = {
        r["tiling"]: {k: r["timings_s"][k] / base[k] for k in ("total", "inference")}
        for r in results[1:]
    }
    if args.json:
        print(json.dumps({"results": results, f"over_{results[0]['tiling']}": ratios}, indent=1))
        return

    first = results[0]
    print(
        f"# case {first['case']} {tuple(first['shape'])} from {case_dir}; "
        f"{platform.processor() or platform.machine()}, device {first['device']}, "
        f"{first['threads']} threads; weights {first['weights']}"
    )
    if not args.checkpoint:
        print("# random weights: timings are representative, the labels are not")
    names = [r["tiling"] for r in results]
    print(f"{'':<14}" + "".join(f"{n:>12}" for n in names))
    for stage in (*STAGES, "total"):
        print(f"{stage + ' s':<14}" + "".join(f"{r['timings_s'][stage]:>12.2f}" for r in results))
    print(f"{'tiles':<14}" + "".join(f"{r['tiles']:>12}" for r in results))
    print(f"{'patch':<14}" + "".join(f"{'x'.join(map(str, r['patch'])):>12}" for r in results))
    print(f"{'peak RSS MiB':<14}" + "".join(f"{r['peak_rss_mib']:>12.0f}" for r in results))
    if any(r["peak_gpu_mib"] is not None for r in results):
        print(
            f"{'peak GPU MiB':<14}" + "".join(f"{(r['peak_gpu_mib'] or 0):>12.0f}" for r in results)
        )
    for name, ratio in ratios.items():
        print(
            f"{name}/{first['tiling']} time: {ratio['total']:.2f} end to end, "
            f"{ratio['inference']:.2f} inference"
        )


if __name__ == "__main__":
    main()
