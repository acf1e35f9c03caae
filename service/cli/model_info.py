"""``omnet model-info``: parameter count and FLOPs of an architecture."""

from __future__ import annotations

import argparse
import json
from typing import Any

from service.cli.common import LazyChoices

NAME = "model-info"
HELP = "parameter count and FLOPs of an architecture"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variant",
        default="omnet_cga",
        choices=LazyChoices("model.net.network", "VARIANTS"),
        metavar="VARIANT",
        help="architecture: %(choices)s (default %(default)s)",
    )
    p.add_argument("--width", type=int, default=32, help="base width (32 in the paper)")
    p.add_argument("--classes", type=int, default=5, help="classes of a single 'mc' network")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from model.net.network import ArchConfig, build_model, count_flops, count_parameters

    config = ArchConfig(variant=args.variant, width=args.width, num_classes=args.classes)
    model = build_model(config)
    info: dict[str, Any] = {
        "variant": config.variant,
        "width": config.width,
        "parameters": count_parameters(model),
        "flops_per_patch": count_flops(model),
        "patch": [32, 32, 16],
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"variant     {info['variant']} (width {info['width']})")
        print(f"parameters  {info['parameters']:,} ({info['parameters'] / 1e6:.3f} M)")
        print(f"FLOPs       {info['flops_per_patch'] / 1e9:.2f} G per 32x32x16 patch")
    return 0
