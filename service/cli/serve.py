"""``omnet serve``: the HTTP API and, unless ``--no-worker``, one worker beside it.

The worker is a child process that ``omnet serve`` supervises: when it exits while the
API runs (a crash, the OOM killer, a ``kill``), it is started again after a short
back-off, so that submitted jobs do not wait for a restart of the whole service. A
worker that keeps dying (:data:`MAX_WORKER_EXITS` exits within
:data:`WORKER_EXIT_WINDOW_S`) stops the API too, and ``omnet serve`` exits with one line
saying so, rather than answering 202 to jobs that nothing will run. The jobs the dead
worker was running are queued again at once and sent ahead of the queue
(:func:`service.recovery.release_lost`), before the new worker starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli.common import CommandError, database_problem

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.config import Settings

NAME = "serve"
HELP = "run the HTTP API and one worker"

logger = logging.getLogger(__name__)

#: The embedded worker may exit this many times within :data:`WORKER_EXIT_WINDOW_S`;
#: the next exit stops ``omnet serve``.
MAX_WORKER_EXITS = 5
WORKER_EXIT_WINDOW_S = 60.0
#: Wait before the first restart, doubled for each further exit in the window.
RESTART_BACKOFF_S = 1.0
MAX_RESTART_BACKOFF_S = 8.0
#: A Ctrl-C or a SIGTERM sent to the process group reaches the worker and ``omnet
#: serve`` at once; a worker exit is only called unexpected when the API has not
#: started shutting down this long after it.
SHUTDOWN_GRACE_S = 1.0
#: How long a stopping worker may take to finish its job before it is killed.
WORKER_STOP_TIMEOUT_S = 60.0
#: uvicorn's exit status when the server could not start.
STARTUP_FAILURE = 3


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-worker", action="store_true", help="run the API only")


def describe_exit(status: int) -> str:
    """A process's exit status in words: ``exited with status 1``, ``was killed by
    SIGKILL``."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


class WorkerSupervisor:
    """Runs one worker process and starts it again whenever it exits unexpectedly.

    A thread waits on the worker. After an exit it waits a back-off (1, 2, 4, 8 s as
    exits accumulate) and starts a new worker, unless :meth:`stop` was called or
    ``stopping()`` says the service is shutting down. Every such exit is first reported
    to ``exited(pid)`` (an exception there is logged and ignored). After
    :data:`MAX_WORKER_EXITS` exits within :data:`WORKER_EXIT_WINDOW_S` it gives up:
    :attr:`failure` says why and ``give_up()`` is called (it stops the API).
    """

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        stopping: Callable[[], bool],
        give_up: Callable[[], None],
        exited: Callable[[int], object] | None = None,
    ) -> None:
        self._cmd = cmd
        self._env = env
        self._stopping = stopping
        self._give_up = give_up
        self._exited = exited
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        #: Why the supervisor gave up, once it has.
        self.failure: str | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self._cmd, env=self._env)
        print(f"omnet serve: worker pid {process.pid}", file=sys.stderr)
        return process

    def start(self) -> int:
        """Starts the worker and its watch; returns the worker's pid."""
        with self._lock:
            self._process = process = self._spawn()
        self._thread = threading.Thread(
            target=self._watch, args=(process,), name="worker-supervisor", daemon=True
        )
        self._thread.start()
        return process.pid

    def _over(self, wait_s: float) -> bool:
        """Waits up to ``wait_s``; True when the service is stopping meanwhile."""
        return self._stopped.wait(wait_s) or self._stopping()

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        exits: deque[float] = deque()
        while True:
            status = process.wait()
            died = time.monotonic()
            if self._over(SHUTDOWN_GRACE_S):
                return
            if self._exited is not None:
                try:
                    self._exited(process.pid)
                except Exception:
                    logger.warning("after the embedded worker's exit", exc_info=True)
            exits.append(died)
            while exits[0] < died - WORKER_EXIT_WINDOW_S:
                exits.popleft()
            if len(exits) >= MAX_WORKER_EXITS:
                self.failure = (
                    f"the embedded worker died {len(exits)} times within "
                    f"{WORKER_EXIT_WINDOW_S:.0f} s (the last one {describe_exit(status)}); "
                    "stopped the API rather than accept jobs that no worker runs (the "
                    "worker's log above says why it dies)"
                )
                self._give_up()
                return
            backoff = min(RESTART_BACKOFF_S * 2 ** (len(exits) - 1), MAX_RESTART_BACKOFF_S)
            logger.warning(
                "the embedded worker (pid %d) %s; starting a new one in %.0f s",
                process.pid,
                describe_exit(status),
                backoff,
            )
            if self._over(max(0.0, backoff - SHUTDOWN_GRACE_S)):
                return
            with self._lock:
                if self._stopped.is_set():
                    return
                self._process = process = self._spawn()

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_S) -> None:
        """Stops the watch, then the worker (SIGTERM: it finishes its job; killed after
        ``timeout`` seconds)."""
        with self._lock:
            self._stopped.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(timeout=SHUTDOWN_GRACE_S + 1.0)


def _where(host: str, port: int, settings: Settings) -> str:
    """The start-up line: where to open the page, which model and device the workers use."""
    from model.weights import BUNDLED_NAME, bundled_checkpoint

    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    paths = [p.strip() for p in settings.checkpoint.split(",") if p.strip()]
    if paths:
        model = ", ".join(Path(p).name for p in paths)
    elif bundled_checkpoint() is not None:
        model = f"the bundled model ({BUNDLED_NAME})"
    else:
        model = "none: set OMNET_CHECKPOINT (this install has no bundled model)"
    access = "open mode (no API key)" if settings.open_mode else "API keys required"
    return (
        f"omnet serve: http://{shown}:{port}/ (web page; API documentation at /docs), "
        f"{access}; model {model}, device {settings.device}"
    )


def _mode(settings: Settings) -> str:
    """The line saying where jobs are queued (the broker's password hidden) and stored."""
    from service.redact import masked_url

    if settings.embedded:
        mode = "embedded (no broker server)"
    else:
        mode = f"broker {masked_url(settings.broker_url or '')}"
    return f"omnet serve: {mode}, storage {settings.storage_dir}"


def _open(settings: Settings, create_app: Callable[[Settings], FastAPI]) -> FastAPI:
    """The API application; a job database that cannot be used (it refuses, or does not
    answer within ``OMNET_DATABASE_TIMEOUT_S``) is one line saying what to check."""
    import sqlalchemy as sa

    started = time.monotonic()
    try:
        return create_app(settings)
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
        waited_s = time.monotonic() - started
        raise CommandError(
            database_problem(settings.database, settings.database_timeout_s, exc, waited_s)
        ) from exc


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.config import get_settings
    from service.recovery import release_lost, worker_name

    settings = get_settings()
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    print(_where(args.host, args.port, settings), file=sys.stderr)
    app = _open(settings, create_app)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))

    def _worker_died(pid: int) -> list[str]:
        """The jobs of the dead worker go back to the queue, ahead of it, at once (its
        message is gone from the embedded mode's folder, or held by Redis until its
        lease expires)."""
        state = app.state
        return release_lost(settings, state.store, state.storage, state.celery, worker_name(pid))

    def _stop_api() -> None:
        server.should_exit = True  # uvicorn's main loop checks it every 0.1 s

    supervisor = None
    if not args.no_worker:
        env = {**os.environ, "OMNET_STORAGE_DIR": str(settings.storage_dir.resolve())}
        # The worker picks its queue itself: the API process never imports torch.
        cmd = [sys.executable, "-m", "service.cli", "worker", "--pool", "solo"]
        cmd += ["--name", "omnet-embedded@%h"]
        supervisor = WorkerSupervisor(
            cmd, env, lambda: server.should_exit, _stop_api, exited=_worker_died
        )
        print(_mode(settings), file=sys.stderr)
        supervisor.start()

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn re-raises SIGTERM after its graceful shutdown; this handler turns it into
    # SystemExit so that the worker below is stopped too.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C, re-raised by uvicorn once it has shut down
        pass
    finally:
        if supervisor is not None:
            supervisor.stop()
    if supervisor is not None and supervisor.failure:
        raise CommandError(supervisor.failure)
    if not server.started:
        return STARTUP_FAILURE
    return 0
