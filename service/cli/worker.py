"""``omnet worker``: a segmentation worker (Celery), started as ``python -m worker``.

The command line never imports the worker package: it builds the worker's command and
replaces itself with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings

NAME = "worker"
HELP = "run a segmentation worker (Celery)"


def worker_command(
    settings: Settings, device: str, pool: str, concurrency: int, name: str | None = None
) -> list[str]:
    """The command line of a worker for ``device`` (``python -m worker``, Celery's worker
    options): GPU workers take the GPU queue first and help with the CPU queue; CPU
    workers take the CPU queue."""
    from model.inference.tiling import resolve_device

    kind = resolve_device(device).type
    queues = (
        [settings.queue("cuda"), settings.queue("cpu")]
        if kind == "cuda"
        else [settings.queue("cpu")]
    )
    cmd = [
        sys.executable,
        "-m",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--queues",
        ",".join(queues),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    if name:
        cmd += ["--hostname", name]
    return cmd


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (OMNET_DEVICE)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo"])
    p.add_argument("--concurrency", type=int, default=1, help="jobs at a time (one per GPU)")
    p.add_argument("--name", default=None, help="worker name (default: celery@hostname)")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for inference (OMNET_THREADS)"
    )


def run(args: argparse.Namespace) -> int:
    if args.device:
        os.environ["OMNET_DEVICE"] = args.device
    if args.threads is not None:
        os.environ["OMNET_THREADS"] = str(args.threads)
    from service.config import get_settings

    settings = get_settings()
    cmd = worker_command(settings, settings.device, args.pool, args.concurrency, args.name)
    os.execv(cmd[0], cmd)
    return 0  # not reached
