"""``omnet export``: a compact copy of a checkpoint (half precision), with notes added."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "export"
HELP = "write a compact (half-precision) copy of a checkpoint"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint to export (e.g. RUN/best.pt)")
    p.add_argument("out", type=Path, help="file to write")
    p.add_argument("--full-precision", action="store_true", help="keep float32 weights")
    p.add_argument(
        "--metadata",
        type=Path,
        action="append",
        default=[],
        help="JSON file whose keys are merged into the checkpoint's metadata (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    from model.net.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    metadata = dict(ckpt.metadata)
    for path in args.metadata:
        try:
            extra = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--metadata {path} is not a readable JSON file: {exc}") from exc
        if not isinstance(extra, dict):
            raise ValueError(f"--metadata {path} must hold a JSON object")
        metadata.update(extra)
    out = save_checkpoint(args.out, ckpt.model, ckpt.config, metadata, half=not args.full_precision)
    size = out.stat().st_size / 2**20
    print(f"{out}: {ckpt.config.variant} width {ckpt.config.width}, {size:.1f} MB")
    return 0
