"""Forward-pass throughput of every variant on 32x32x16 patches (inference, no grad).

    python bench/forward.py [--width 32] [--batch-sizes 1 4 16] [--repeats 3]

Prints patches per second and FLOPs per patch for each variant and batch size, and
each variant's speed relative to plain OM-Net measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from model.net.network import VARIANTS, ArchConfig, build_model, count_flops, count_parameters


def time_forward(model: torch.nn.Module, batch: int, repeats: int, device: str) -> float:
    x = torch.randn(batch, 4, 16, 32, 32, device=device)
    with torch.inference_mode():
        model(x)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "mc_cascade"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}, width {args.width}"
    )
    rows = []
    for variant in args.variants:
        torch.manual_seed(0)
        model = build_model(ArchConfig(variant=variant, width=args.width)).eval()
        flops = count_flops(model)
        model.to(args.device)
        for batch in args.batch_sizes:
            pps = time_forward(model, batch, args.repeats, args.device)
            rows.append(
                {
                    "variant": variant,
                    "batch": batch,
                    "patches_per_s": pps,
                    "gflops_per_patch": flops / 1e9,
                    "params": count_parameters(model),
                }
            )
    base = {r["batch"]: r["patches_per_s"] for r in rows if r["variant"] == "omnet"}
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"{'variant':<17}{'batch':>6}{'patches/s':>11}{'vs omnet':>10}"
        f"{'GFLOP/patch':>13}{'params':>12}"
    )
    for r in rows:
        rel = r["patches_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        print(
            f"{r['variant']:<17}{r['batch']:>6}{r['patches_per_s']:>11.2f}{rel:>10.2f}"
            f"{r['gflops_per_patch']:>13.2f}{r['params']:>12,}"
        )


if __name__ == "__main__":
    main()
