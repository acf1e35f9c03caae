"""``omnet serve``: the HTTP API and, unless ``--no-worker``, one worker beside it."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

NAME = "serve"
HELP = "run the HTTP API and one worker"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-worker", action="store_true", help="run the API only")


def run(args: argparse.Namespace) -> int:
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
