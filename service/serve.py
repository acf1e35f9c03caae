"""``omnet serve`` (API + one worker) and ``omnet worker`` (a Celery worker)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

logger = logging.getLogger(__name__)


def worker_command(device: str, pool: str, concurrency: int, name: str | None = None) -> list[str]:
    """The celery command line of a worker for ``device``: GPU workers take the GPU queue
    first and help with the CPU queue; CPU workers take the CPU queue."""
    from model.tiling import resolve_device
    from service.config import get_settings

    settings = get_settings()
    kind = resolve_device(device).type
    queues = (
        [settings.queue("cuda"), settings.queue("cpu")]
        if kind == "cuda"
        else [settings.queue("cpu")]
    )
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
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


def configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-worker", action="store_true", help="run the API only")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.config import get_settings

    settings = get_settings()
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    worker = None
    if not args.no_worker:
        env = {**os.environ, "OMNET_STORAGE_DIR": str(settings.storage_dir.resolve())}
        # The worker picks its queue itself: the API process never imports torch.
        cmd = [sys.executable, "-m", "service.cli", "worker", "--pool", "solo"]
        cmd += ["--name", "omnet-embedded@%h"]
        worker = subprocess.Popen(cmd, env=env)
        mode = (
            "embedded (no broker server)" if settings.embedded else f"broker {settings.broker_url}"
        )
        print(
            f"omnet serve: worker pid {worker.pid}, {mode}, storage {settings.storage_dir}",
            file=sys.stderr,
        )

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn re-raises SIGTERM after its graceful shutdown; this handler turns it into
    # SystemExit so that the worker below is stopped too.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def configure_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (OMNET_DEVICE)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo"])
    p.add_argument("--concurrency", type=int, default=1, help="jobs at a time (one per GPU)")
    p.add_argument("--name", default=None, help="worker name (default: celery@hostname)")


def worker(args: argparse.Namespace) -> int:
    if args.device:
        os.environ["OMNET_DEVICE"] = args.device
    cmd = worker_command(
        os.environ.get("OMNET_DEVICE", "auto"), args.pool, args.concurrency, args.name
    )
    os.execv(cmd[0], cmd)
    return 0  # not reached
