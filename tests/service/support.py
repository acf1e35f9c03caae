"""Real service processes for the service tests: uvicorn APIs, Celery workers, `omnet serve`.

A :class:`Stack` is one deployment: a storage folder, a queue prefix and the environment
variables every process of it reads (``OMNET_*``). Its processes run in their own process
groups with their output in log files, so a test can SIGKILL a worker, restart an API,
and show the logs' tails when something fails.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import nibabel as nib
import numpy as np
import pytest

from model.io.phantom import write_phantom
from service.db import Job, JobStore

T = TypeVar("T")

MODALITY_FIELDS = ("t1", "t1ce", "t2", "flair")
GZ = "application/gzip"
#: Test callers and their keys; the two hospital keys share a prefix and name no owner.
API_KEYS = {
    "alice": "k1",
    "bob": "k2",
    "hospital-a": "hospital-A-9f8e7d",
    "hospital-b": "hospital-B-1a2b3c",
}
FINAL_STATES = ("succeeded", "failed", "cancelled")
PYTHON = sys.executable
#: The ``omnet`` command of this interpreter's environment (``.venv/bin/omnet``).
OMNET = (
    [str(Path(PYTHON).with_name("omnet"))]
    if Path(PYTHON).with_name("omnet").exists()
    else [PYTHON, "-m", "service.cli"]
)

#: Live stacks, so that a failing test can attach their logs to its report.
ACTIVE: list[Stack] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    stack: Stack | None = None,
    interval: float = 0.2,
) -> T:
    """Calls ``probe`` until it returns something truthy; fails after ``timeout`` seconds
    with ``what``, the last value seen and the stack's log tails."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            logs = f"\n{stack.tails()}" if stack else ""
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}{logs}"
            )
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """The live (not zombie) child processes of ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue  # the process went meanwhile
        if int(ppid) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def _no_server_errors(response: httpx.Response) -> None:
    """Event hook of every test client: no request may end in an unhandled server error."""
    if response.status_code == 500:
        response.read()
        raise AssertionError(
            f"{response.request.method} {response.request.url} answered 500: {response.text}"
        )


@dataclass
class Proc:
    """One service process (and its children) in its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to the whole process group (``omnet serve`` has a worker child)."""
        if self.alive():
            with suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
        if sig == signal.SIGKILL:
            self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a Celery worker finishes its job and unregisters), then SIGKILL."""
        if self.alive():
            self.kill(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with suppress(ProcessLookupError, PermissionError):  # children left behind
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)


@dataclass
class Api:
    """A running API process and how to talk to it."""

    proc: Proc
    url: str
    clients: list[httpx.Client] = field(default_factory=list)

    def client(
        self, owner: str | None = "alice", timeout: float = 60.0, **headers: str
    ) -> httpx.Client:
        """An HTTP client sending ``owner``'s API key (none when ``owner`` is None), which
        waits ``timeout`` seconds for an answer."""
        if owner is not None:
            headers = {"X-API-Key": API_KEYS[owner], **headers}
        client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            event_hooks={"response": [_no_server_errors]},
        )
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.proc.stop()


class Stack:
    """The processes of one deployment, sharing a storage folder and a queue prefix."""

    def __init__(self, name: str, root: Path, env: dict[str, str]) -> None:
        self.name = name
        self.root = root
        self.storage = root / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("OMNET_")}
        self.env = {
            **base,
            "PYTHONUNBUFFERED": "1",
            "OMNET_STORAGE_DIR": str(self.storage),
            **env,
        }
        self.procs: list[Proc] = []
        self.apis: list[Api] = []
        self._store: JobStore | None = None
        ACTIVE.append(self)

    # ------------------------------------------------------------------ processes
    def spawn(self, name: str, cmd: list[str], **env: str) -> Proc:
        log = self.logs / f"{name}.log"
        n = 1
        while log.exists():
            n += 1
            log = self.logs / f"{name}-{n}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                cmd,
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_api(self, name: str = "api", **env: str) -> Api:
        """A uvicorn process serving ``service.app:create_app`` (settings from the env)."""
        port = free_port()
        cmd = [PYTHON, "-m", "uvicorn", "--factory", "service.app:create_app"]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        api = Api(self.spawn(name, cmd, **env), f"http://127.0.0.1:{port}")
        self.apis.append(api)
        return api

    def start_serve(self, name: str = "serve", **env: str) -> Api:
        """``omnet serve``: the API and an embedded worker in one command."""
        port = free_port()
        proc = self.spawn(name, [*OMNET, "serve", "--port", str(port)], **env)
        api = Api(proc, f"http://127.0.0.1:{port}")
        self.apis.append(api)
        return api

    def start_worker(self, name: str = "worker", pool: str = "solo", **env: str) -> Proc:
        """``omnet worker --pool POOL --device cpu`` (it execs Celery: solo is one process,
        prefork a parent and one child)."""
        cmd = [*OMNET, "worker", "--pool", pool, "--device", "cpu", "--name", f"{name}@%h"]
        return self.spawn(name, cmd, **env)

    def start_redis(self, name: str = "redis") -> tuple[Proc, str]:
        """A private redis-server (no persistence) that a test may pause or empty."""
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed; the broker fault tests need one")
        port = free_port()
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", str(self.root)]
        proc = self.spawn(name, cmd)
        url = f"redis://127.0.0.1:{port}/0"

        def answers() -> bool:
            import redis

            try:
                return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_until(answers, 20, f"{name} to answer", self)
        return proc, url

    def start_orthanc(self, name: str = "orthanc", port: int | None = None) -> tuple[Proc, str]:
        """A private Orthanc with its DICOMweb plugin (HTTP only, no DICOM port, no
        authentication, loopback only); returns it and its DICOMweb root URL."""
        binary, plugin = shutil.which("Orthanc"), orthanc_plugin()
        if binary is None or plugin is None:
            pytest.skip(
                "Orthanc and its DICOMweb plugin are not installed (apt-get install orthanc "
                "orthanc-dicomweb); the PACS tests need them"
            )
        port = port or free_port()
        config = {
            "Name": name,
            "StorageDirectory": str(self.root / f"{name}-db"),
            "IndexDirectory": str(self.root / f"{name}-db"),
            "HttpPort": port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.root / f"{name}.json"
        path.write_text(json.dumps(config))
        proc = self.spawn(name, [binary, str(path)])
        url = f"http://127.0.0.1:{port}/dicom-web"
        wait_until(lambda: dicomweb_answers(url), 30, f"{name} to answer", self)
        return proc, url

    def wait_api(self, api: Api, timeout: float = 90.0) -> Api:
        def up() -> bool:
            if not api.proc.alive():
                raise AssertionError(f"{api.proc.name} exited:\n{api.proc.tail()}")
            try:
                return httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout, f"{api.proc.name} to answer /healthz", self)
        return api

    def wait_worker(self, worker: Proc, timeout: float = 120.0) -> str:
        """Waits until ``worker`` has registered (model loaded); returns its record name."""
        name = f"{socket.gethostname()}:{worker.pid}"

        def registered() -> bool:
            if not worker.alive():
                raise AssertionError(f"{worker.name} exited:\n{worker.tail()}")
            return any(w["name"] == name for w in self.store.live_workers(3.0))

        wait_until(registered, timeout, f"{worker.name} to register as {name}", self)
        return name

    def close(self) -> None:
        for api in self.apis:
            api.close()
        for proc in self.procs:
            proc.stop()
        if self._store is not None:
            self._store.engine.dispose()
        if self in ACTIVE:
            ACTIVE.remove(self)

    def tails(self, lines: int = 40) -> str:
        parts = []
        for proc in self.procs:
            state = "running" if proc.alive() else f"exited {proc.popen.returncode}"
            parts.append(f"----- {self.name}/{proc.name} ({state}), {proc.log}\n{proc.tail(lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ job records
    @property
    def store(self) -> JobStore:
        """The stack's job records, read directly (what the API does not show)."""
        if self._store is None:
            url = self.env.get("OMNET_DATABASE_URL") or f"sqlite:///{self.storage / 'jobs.sqlite'}"
            self._store = JobStore(url)
        return self._store

    def record(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def job_dir(self, job_id: str) -> Path:
        return self.storage / "jobs" / job_id

    def wait_state(
        self, client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 90.0
    ) -> dict[str, Any]:
        """Polls GET /v1/jobs/{id} until its state is one of ``states``."""
        seen: dict[str, Any] = {}

        def reached() -> dict[str, Any] | None:
            response = client.get(f"/v1/jobs/{job_id}")
            assert response.status_code == 200, response.text
            seen.update(response.json())
            if seen["state"] in states:
                return dict(seen)
            if seen["state"] in FINAL_STATES:
                raise AssertionError(
                    f"job {job_id} ended {seen['state']}, not {states}: {seen}\n{self.tails()}"
                )
            return None

        return wait_until(reached, timeout, f"job {job_id} to be {'/'.join(states)}", self, 0.25)


@contextmanager
def stack(name: str, root: Path, env: dict[str, str]) -> Iterator[Stack]:
    """A :class:`Stack` whose processes are always stopped at the end."""
    s = Stack(name, root, env)
    try:
        yield s
    finally:
        s.close()


# --------------------------------------------------------------------------- Orthanc
#: Where the Debian packages put Orthanc's plugins.
ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")


def orthanc_plugin() -> Path | None:
    """The DICOMweb plugin of an installed Orthanc, or None."""
    for folder in ORTHANC_PLUGIN_DIRS:
        path = Path(folder) / "libOrthancDicomWeb.so"
        if path.is_file():
            return path
    return None


def dicomweb_answers(url: str) -> bool:
    """Whether a DICOMweb server answers QIDO-RS at ``url``."""
    try:
        return httpx.get(f"{url}/studies", params={"limit": 1}, timeout=3).status_code == 200
    except httpx.TransportError:
        return False


# --------------------------------------------------------------------------- inputs
def nifti_gz(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A .nii.gz file's bytes."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1)


@dataclass(frozen=True)
class Phantom:
    """A synthetic case as the bytes of its five .nii.gz files, plus its grid."""

    data: dict[str, bytes]  # t1, t1ce, t2, flair, reference
    images: dict[str, np.ndarray]
    labels: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int, int]

    def files(
        self, with_reference: bool = False, **replace: tuple[str, bytes] | None
    ) -> list[tuple[str, tuple[str, bytes, str]]]:
        """Multipart files for httpx: the four modalities (and the reference), with
        ``replace={field: (filename, bytes)}`` swapped in and ``field=None`` left out."""
        fields = [*MODALITY_FIELDS, "reference"] if with_reference else list(MODALITY_FIELDS)
        out = []
        for name in [*fields, *(k for k in replace if k not in fields)]:
            item = replace[name] if name in replace else (f"case_{name}.nii.gz", self.data[name])
            if item is not None:
                out.append((name, (item[0], item[1], GZ)))
        return out


#: Settings that make a job last long enough for a test to act on it while it runs (kill
#: its worker, cancel it): the paper's overlapping tiles, 8 mirrorings each, in float32
#: rather than the bfloat16 a CPU with AMX takes by default. On LONG_SHAPE's grid that is
#: 161 tiles, 8 passes each: about 18 s of inference on a loaded 2-core machine and several
#: seconds on an idle one, where the 48 x 48 x 32 phantom's 26 tiles take a fifth of a
#: second - less than a test needs to see the job running and act.
SLOW_JOB = {"OMNET_TILING": "paper", "OMNET_TTA": "true", "OMNET_PRECISION": "float32"}
#: The grid of a job that a test acts on while it runs (8 times the phantom's voxels).
LONG_SHAPE = (96, 96, 64)


def write_phantom_case(out_dir: Path, name: str, shape: tuple[int, int, int], seed: int) -> Phantom:
    """A phantom case written under ``out_dir`` (:func:`model.io.phantom.write_phantom`),
    read back as a :class:`Phantom`."""
    paths = write_phantom(out_dir, name=name, shape=shape, seed=seed)
    data = {m: paths[m].read_bytes() for m in MODALITY_FIELDS}
    data["reference"] = paths["seg"].read_bytes()
    seg = nib.load(paths["seg"])
    images = {m: np.asarray(nib.load(paths[m]).dataobj) for m in MODALITY_FIELDS}
    return Phantom(data, images, np.asarray(seg.dataobj), seg.affine, shape)


def base_env(checkpoint: Path, **extra: str) -> dict[str, str]:
    """Settings shared by every test deployment (fast liveness, tiny model, two keys)."""
    return {
        "OMNET_CHECKPOINT": str(checkpoint),
        "OMNET_API_KEYS": "k1:alice,k2:bob,hospital-A-9f8e7d,hospital-B-1a2b3c",
        "OMNET_WORKER_HEARTBEAT_S": "1",
        "OMNET_STALE_AFTER_S": "3",
        "OMNET_VISIBILITY_TIMEOUT_S": "6",
        "OMNET_DEVICE": "cpu",
        "OMNET_TILING": "wide",
        **extra,
    }


def redis_env(redis_url: str, prefix: str, checkpoint: Path, **extra: str) -> dict[str, str]:
    return base_env(checkpoint, OMNET_BROKER_URL=redis_url, OMNET_QUEUE_PREFIX=prefix, **extra)


def queued_messages(redis_url: str, queue: str) -> int:
    """Messages waiting in a Redis queue (every priority list of it)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return sum(
            int(client.llen(key))
            for key in client.scan_iter(match=f"{queue}*")
            if client.type(key) == b"list"
        )
    finally:
        client.close()


# ------------------------------------------------------------ a failing HTTP server
class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with its server's ``status`` and an empty body."""

    def _answer(self) -> None:
        self.server.requests += 1  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, *_args: object) -> None:
        pass


@contextmanager
def status_server(status: int) -> Iterator[tuple[str, http.server.HTTPServer]]:
    """A real HTTP server on loopback that answers every request with ``status`` (a
    DICOMweb server that is overloaded, restarting or refusing); yields its DICOMweb
    root URL and the server, whose ``requests`` counts what it was sent."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    server.status, server.requests = status, 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/dicom-web", server
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------- a proxy that stops forwarding
class PausableProxy:
    """A TCP proxy on loopback to ``target`` (host, port) that can be paused: it then
    accepts connections but forwards nothing either way (what is sent to it waits in its
    sockets), as a hung server, a stopped connection pooler or a network that holds the
    packets does.
    What it held is forwarded on :meth:`resume`. :meth:`pause_on` pauses it when a client
    sends the given bytes, holding them (e.g. a transaction's COMMIT)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._trigger: bytes | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def pause(self) -> None:
        self._flowing.clear()

    def pause_on(self, marker: bytes) -> None:
        self._trigger = marker

    def resume(self) -> None:
        self._trigger = None
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for src, dst, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, upstream), daemon=True, name="proxy-pump"
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                trigger = self._trigger
                if upstream and trigger is not None and trigger in data:
                    self._trigger = None
                    self._flowing.clear()
                self._flowing.wait()  # what arrived while paused waits for the resume
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            with suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)


@contextmanager
def open_app(storage: Path, database_url: str) -> Iterator[Any]:
    """An in-process API in open mode (no keys) on ``database_url``, as a TestClient;
    its job store's connections are closed at the end."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(storage_dir=storage, open_mode=True, database_url=database_url))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    app.state.store.engine.dispose()


def store_of(client: Any) -> JobStore:
    """The job store of an :func:`open_app` client."""
    store: JobStore = client.app.state.store
    return store
