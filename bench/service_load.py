"""Load test of the HTTP service: jobs per minute, latency, upload overhead and memory.

    python bench/service_load.py --embedded [--checkpoint PATH | --bundled] [--threads N]
    python bench/service_load.py --redis redis://127.0.0.1:6379 [--workers 2] [--threads N]
    python bench/service_load.py --url http://HOST:8000 --api-key KEY
                                 [--api-pid PID] [--worker-pid PID ...]
    python bench/service_load.py --configurations embedded redis-1x2 redis-2x1
                                 [--redis URL] --bundled --case [DIR] --jobs 10
    common: [--clients N] [--jobs 12 | --duration SECONDS] [--case [DIR] |
            --shape 48 48 32 --cases 3] [--poll S] [--device cpu] [--tiling wide] [--json]

``--embedded`` starts ``omnet serve`` (API + one solo worker, filesystem transport and
SQLite, nothing else needed) on a temporary storage folder. ``--redis URL`` starts an
API (``omnet serve --no-worker``) and ``--workers`` processes of ``omnet worker --pool
solo`` against that Redis, in a dedicated database (``--redis-db``, unless the URL
names one) with queues under a unique ``OMNET_QUEUE_PREFIX``; the bench's queue keys are
deleted at the end and its results expire after an hour. ``--url`` measures a service
that is already running; give the pids of its processes to have their memory reported.

The service started here serves a tiny random network (width 4, seed 0) unless
``--checkpoint`` or ``--bundled`` (the model shipped in model/weights/) is given: with
the random network the timings are those of the service around a small network, not of
a full-size model. ``--threads N`` sets ``OMNET_THREADS`` of the started workers (the
threads each runs inference on; unset: PyTorch's default, one per core).

Each client thread uploads a case (t1, t1ce, t2 and flair, with an Idempotency-Key) and
polls the job until it finishes, then submits the next, until ``--jobs`` jobs in all
were submitted or ``--duration`` seconds have passed. The case is a real BraTS case with
``--case DIR`` (a folder with one file per modality, .nii.gz or .nii.bz2); ``--case``
alone takes the first case folder under ``$OMNET_DATA_DIR/brats2018`` (default
../shared/data beside the checkout), and the bench stops, saying so, when there is
none. Without ``--case`` it uploads ``--cases`` phantoms written with
:func:`model.io.phantom.write_phantom`. Reported: succeeded jobs per minute and cases
per hour (first POST to last job done), latency POST -> succeeded (p50, p95; it includes
the time queued and up to one poll interval), the worker's run time (started ->
finished), the POST request alone (upload, validation, queueing: the API's overhead per
case) and the resident memory of the API and worker processes (at the end and the
highest sampled).

``--configurations`` runs several started services one after the other on the same
case and the same number of jobs, and prints one table: ``embedded`` (``omnet serve``,
one worker with ``--threads`` threads, default every usable core), ``embedded-1xT``,
and ``redis-WxT`` (an API and W solo workers of T threads each on ``--redis``, default
redis://127.0.0.1:6379). Each gets 2 x W clients unless ``--clients`` is given, so that
a job is waiting for each worker whenever it finishes one. The last column is each
configuration's cases per hour over the first's: compare configurations through these
ratios, measured in one run, rather than across runs on a machine whose load changes.

Needs httpx (in the project's ``dev`` extra); psutil is used when installed, else
``/proc``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

try:
    import httpx
except ImportError:  # pragma: no cover - depends on the install
    sys.exit("bench/service_load.py needs httpx: pip install httpx (or pip install -e '.[dev]')")

try:
    import psutil
except ImportError:
    psutil = None

MODALITIES = ("t1", "t1ce", "t2", "flair")
FINISHED = ("succeeded", "failed", "cancelled")
API_KEY = "bench-key"


# ----------------------------------------------------------------------------- memory
def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 when it is gone)."""
    if psutil is not None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``."""
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *descendants(child)]
    return out


class MemorySampler(threading.Thread):
    """Samples the summed RSS of each named group of processes every ``interval`` s."""

    def __init__(self, groups: dict[str, list[int]], interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.groups, self.interval = groups, interval
        self.last: dict[str, int] = {}
        self.peak: dict[str, int] = dict.fromkeys(groups, 0)
        self._stop_event = threading.Event()

    def sample(self) -> None:
        for name, pids in self.groups.items():
            total = sum(rss_bytes(p) for p in pids)
            self.last[name] = total
            self.peak[name] = max(self.peak[name], total)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


# ----------------------------------------------------------------------------- processes
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


def omnet_command() -> list[str]:
    """The ``omnet`` entry point of this interpreter's install."""
    script = Path(sys.executable).parent / "omnet"
    if script.is_file():
        return [str(script)]
    found = shutil.which("omnet")
    if found:
        return [found]
    return [sys.executable, "-m", "service.cli"]


def start(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    """Starts ``omnet ARGS`` in a session of its own (so it and its children stop together)."""
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [*omnet_command(), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def stop(procs: list[Proc], timeout: float = 60.0) -> None:
    """SIGTERM to each started process group (the process and its children), then SIGKILL."""
    for proc in procs:
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        # The group may outlive its leader (an embedded worker still shutting down).
        while _group_alive(proc.popen.pid) and time.monotonic() < deadline:
            proc.popen.poll()
            time.sleep(0.2)
        if _group_alive(proc.popen.pid):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def log_tail(proc: Proc, lines: int = 30) -> str:
    try:
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, workers: int, procs: list[Proc], timeout: float) -> dict[str, Any]:
    """Waits until /readyz reports ``workers`` live workers; fails if a process exits."""
    deadline = time.monotonic() + timeout
    checks: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise SystemExit(
                    f"{proc.name} exited with status {proc.popen.returncode}; its log "
                    f"({proc.log}) ends:\n{log_tail(proc)}"
                )
        try:
            answer = httpx.get(f"{base}/readyz", timeout=5)
            checks = answer.json().get("checks", {})
            if answer.status_code == 200 and checks.get("workers", 0) >= workers:
                return checks
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service was not ready after {timeout:.0f} s (last checks: {checks})")


def service_env(
    storage: Path, checkpoint: Path, args: argparse.Namespace, threads: int | None
) -> dict[str, str]:
    """The environment of the started processes: OMNET_* from the caller are not inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNET_")}
    env.update(
        OMNET_STORAGE_DIR=str(storage),
        OMNET_CHECKPOINT=str(checkpoint),
        OMNET_API_KEYS=f"{API_KEY}:bench",
        OMNET_DEVICE=args.device,
        OMNET_TILING=args.tiling,
        OMNET_BATCH_SIZE=str(args.batch_size),
        OMNET_RETENTION_HOURS="1",
    )
    if threads is not None:
        env["OMNET_THREADS"] = str(threads)
    return env


def random_checkpoint(path: Path, width: int) -> Path:
    import torch

    from model.net.checkpoint import save_checkpoint
    from model.net.network import ArchConfig, build_model

    torch.manual_seed(0)
    config = ArchConfig(width=width)
    save_checkpoint(path, build_model(config), config)
    return path


def redis_url(url: str, default_db: int) -> str:
    """``url`` with ``default_db`` as its database unless it names one."""
    parts = urlsplit(url)
    if parts.path.strip("/"):
        return url
    return urlunsplit((parts.scheme, parts.netloc, f"/{default_db}", parts.query, ""))


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def delete_redis_keys(url: str, prefix: str) -> int:
    """Deletes the keys naming ``prefix`` (the bench's queues and their bindings)."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"*{prefix}*"))
    if keys:
        client.delete(*keys)
    return len(keys)


@dataclass
class Target:
    """A service to load: its URL and the processes whose memory is reported."""

    base: str
    mode: str
    memory: dict[str, list[int]]
    workers: int
    api_key: str = API_KEY


@dataclass(frozen=True)
class Configuration:
    """A service to start: ``embedded`` (omnet serve) or ``redis`` with ``workers`` solo
    workers, each running inference on ``threads`` threads (None: PyTorch's default)."""

    name: str
    mode: str
    workers: int
    threads: int | None


CONFIGURATION = re.compile(r"(embedded|redis)(?:-(\d+)x(\d+))?")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_configuration(text: str, threads: int | None) -> Configuration:
    """``embedded``, ``embedded-1xT`` or ``redis-WxT``; plain ``embedded`` runs on
    ``threads`` threads, by default every usable core."""
    match = CONFIGURATION.fullmatch(text)
    if match is None or (match[1] == "redis" and match[2] is None):
        raise ValueError(f"{text!r}: a configuration is embedded, embedded-1xT or redis-WxT")
    mode = match[1]
    if match[2] is None:
        return Configuration(text, mode, 1, threads or usable_cpus())
    workers, per_worker = int(match[2]), int(match[3])
    if workers < 1 or per_worker < 1 or (mode == "embedded" and workers != 1):
        raise ValueError(f"{text!r}: W and T at least 1, and one embedded worker")
    return Configuration(text, mode, workers, per_worker)


def resolve_checkpoint(args: argparse.Namespace, work: Path) -> Path:
    """The checkpoint the started services serve: ``--checkpoint``, the bundled model
    (``--bundled``) or a random network written once into ``work``."""
    if args.checkpoint:
        return Path(args.checkpoint).resolve()
    if args.bundled:
        from model.weights import bundled_checkpoint

        bundled = bundled_checkpoint()
        if bundled is None:
            raise SystemExit("--bundled: this install has no bundled model (model/weights/)")
        return bundled
    path = work / "random.pt"
    return path if path.is_file() else random_checkpoint(path, args.width)


def describe_checkpoint(args: argparse.Namespace) -> str:
    if args.checkpoint:
        return str(args.checkpoint)
    if args.bundled:
        from model.weights import BUNDLED_NAME

        return f"bundled ({BUNDLED_NAME})"
    return f"random width {args.width} (seed 0)"


@contextmanager
def started_service(
    args: argparse.Namespace, conf: Configuration, work: Path, checkpoint: Path
) -> Iterator[Target]:
    log_dir = work / "logs"
    log_dir.mkdir(parents=True)
    env = service_env(work / "storage", checkpoint, args, conf.threads)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[Proc] = []
    broker = None
    prefix = f"omnet-bench-{uuid.uuid4().hex[:8]}"
    try:
        threads = ""
        if conf.threads:
            threads = f", {conf.threads} thread{'s' if conf.threads > 1 else ''}"
            threads += " each" if conf.workers > 1 else ""
        if conf.mode == "embedded":
            procs.append(start("serve", ["serve", "--port", str(port)], env, log_dir))
            wait_ready(base, 1, procs, args.startup_timeout)
            api = procs[0].popen.pid
            memory = {"api (omnet serve)": [api], "worker (embedded, solo)": descendants(api)}
            mode = f"embedded: omnet serve (API + 1 solo worker{threads}), device {args.device}"
            workers = 1
        else:
            import redis

            broker = redis_url(args.redis, args.redis_db)
            try:
                redis.Redis.from_url(broker, socket_timeout=5).ping()
            except redis.RedisError as exc:
                raise SystemExit(f"Redis at {broker} does not answer: {exc}") from exc
            env.update(OMNET_BROKER_URL=broker, OMNET_QUEUE_PREFIX=prefix)
            procs.append(start("api", ["serve", "--no-worker", "--port", str(port)], env, log_dir))
            for i in range(1, conf.workers + 1):
                worker_args = ["worker", "--pool", "solo", "--device", args.device]
                worker_args += ["--name", f"bench{i}-{prefix}@%h"]
                procs.append(start(f"worker{i}", worker_args, env, log_dir))
            wait_ready(base, conf.workers, procs, args.startup_timeout)
            memory = {"api (serve --no-worker)": [procs[0].popen.pid]}
            for proc in procs[1:]:
                pid = proc.popen.pid
                memory[f"{proc.name} (solo)"] = [pid, *descendants(pid)]
            mode = (
                f"redis {_without_password(broker)} (queues {prefix}.*): API + "
                f"{conf.workers} solo worker{'s' if conf.workers > 1 else ''}{threads}, "
                f"device {args.device}"
            )
            workers = conf.workers
        yield Target(base, mode, memory, workers)
    except BaseException:
        for proc in procs:
            print(f"--- {proc.name} log ({proc.log}) ends:\n{log_tail(proc)}", file=sys.stderr)
        raise
    finally:
        stop(procs)
        if broker is not None:
            delete_redis_keys(broker, prefix)


@contextmanager
def external_service(args: argparse.Namespace) -> Iterator[Target]:
    base = args.url.rstrip("/")
    memory: dict[str, list[int]] = {}
    if args.api_pid:
        memory["api"] = [args.api_pid]
    for i, pid in enumerate(args.worker_pid or [], 1):
        memory[f"worker{i}"] = [pid, *descendants(pid)]
    checks = wait_ready(base, 1, [], args.startup_timeout)
    workers = int(checks.get("workers", 0))
    yield Target(base, f"external service {base}", memory, workers, args.api_key)


# ----------------------------------------------------------------------------- load
@dataclass
class JobResult:
    client: int
    state: str
    post_s: float
    latency_s: float | None = None
    queued_s: float | None = None
    run_s: float | None = None
    error: str | None = None


@dataclass
class Plan:
    """Hands out job numbers until ``jobs`` were taken or ``duration`` has passed."""

    jobs: int | None
    duration: float | None
    started: float = field(default_factory=time.monotonic)
    taken: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self) -> int | None:
        with self.lock:
            if self.jobs is not None and self.taken >= self.jobs:
                return None
            if self.duration is not None and time.monotonic() - self.started >= self.duration:
                return None
            self.taken += 1
            return self.taken - 1


#: A case to upload: modality -> (file name, bytes).
Case = dict[str, tuple[str, bytes]]


def write_cases(folder: Path, shape: tuple[int, int, int], count: int) -> list[Case]:
    """Writes ``count`` phantoms (seeds 0..count-1) and returns their files."""
    from model.io.phantom import write_phantom

    cases = []
    for seed in range(count):
        paths = write_phantom(folder, name=f"case{seed}", shape=shape, seed=seed)
        cases.append({m: (paths[m].name, paths[m].read_bytes()) for m in MODALITIES})
    return cases


def cases_root() -> Path:
    """Where ``--case`` alone looks: ``$OMNET_DATA_DIR/brats2018`` (default
    ../shared/data/brats2018 beside the checkout)."""
    from model.training.data import DATA_ENV, resolve_data_dir

    return resolve_data_dir(os.environ.get(DATA_ENV)) / "brats2018"


def default_case() -> Path | None:
    """The first case folder under :func:`cases_root`, or None."""
    from model.io.nifti.files import find_cases

    root = cases_root()
    return next(iter(find_cases(root)), None) if root.is_dir() else None


def read_case(folder: Path) -> Case:
    """The modality files of a case folder (``*_t1.nii.gz``, ... or ``.nii.bz2``)."""
    from model.io.nifti.files import find_case_files
    from model.io.volumes import InputError

    try:
        paths = find_case_files(folder)
    except InputError as exc:
        raise SystemExit(f"--case {folder}: {exc}") from None
    return {m: (paths[m].name, paths[m].read_bytes()) for m in MODALITIES}


def upload_name(name: str) -> tuple[str, str]:
    """The file name a modality is uploaded under, and its media type."""
    for suffix, media in ((".nii.gz", "application/gzip"), (".nii.bz2", "application/x-bzip2")):
        if name.endswith(suffix):
            return suffix, media
    return ".nii", "application/octet-stream"


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def run_client(
    index: int,
    target: Target,
    cases: list[Case],
    plan: Plan,
    results: list[JobResult],
    poll: float,
    job_timeout: float,
    run_id: str,
) -> None:
    headers = {"X-API-Key": target.api_key}
    with httpx.Client(base_url=target.base, headers=headers, timeout=300) as http:
        while (n := plan.next()) is not None:
            case = cases[n % len(cases)]
            files = {}
            for m, (name, data) in case.items():
                suffix, media = upload_name(name)
                files[m] = (f"{m}{suffix}", data, media)
            start_t = time.perf_counter()
            try:
                answer = http.post(
                    "/v1/jobs", files=files, headers={"Idempotency-Key": f"{run_id}-{n}"}
                )
            except httpx.HTTPError as exc:
                results.append(
                    JobResult(index, "error", time.perf_counter() - start_t, error=str(exc))
                )
                continue
            post_s = time.perf_counter() - start_t
            if answer.status_code != 202:
                results.append(JobResult(index, "error", post_s, error=answer.text[:200]))
                continue
            url = answer.json()["status_url"]
            status: dict[str, Any] = {}
            while time.perf_counter() - start_t < job_timeout:
                time.sleep(poll)
                try:
                    status = http.get(url).json()
                except httpx.HTTPError:
                    continue
                if status.get("state") in FINISHED:
                    break
            latency = time.perf_counter() - start_t
            state = status.get("state", "unknown")
            if state not in FINISHED:
                state = "timeout"
            error = status.get("error")
            results.append(
                JobResult(
                    index,
                    state,
                    post_s,
                    latency_s=latency,
                    queued_s=_seconds_between(status.get("created_at"), status.get("started_at")),
                    run_s=_seconds_between(status.get("started_at"), status.get("finished_at")),
                    error=f"{error['code']}: {error['message']}" if error else None,
                )
            )


def percentiles(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return float(p50), float(p95)


def machine() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def run_load(target: Target, args: argparse.Namespace, cases: list[Case], clients: int) -> dict:
    sampler = MemorySampler(target.memory)
    sampler.sample()
    sampler.start()
    results: list[JobResult] = []
    plan = Plan(args.jobs, args.duration)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    threads = [
        threading.Thread(
            target=run_client,
            args=(i, target, cases, plan, results, args.poll, args.job_timeout, run_id),
            name=f"client-{i}",
        )
        for i in range(clients)
    ]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    sampler.stop()

    done = [r for r in results if r.state == "succeeded"]
    mib = 2**20
    return {
        "elapsed_s": elapsed,
        "submitted": len(results),
        "states": {
            s: sum(r.state == s for r in results) for s in sorted({r.state for r in results})
        },
        "clients": clients,
        "jobs_per_min": 60 * len(done) / elapsed if elapsed > 0 else 0.0,
        "cases_per_hour": 3600 * len(done) / elapsed if elapsed > 0 else 0.0,
        "latency_s": percentiles([r.latency_s for r in done if r.latency_s is not None]),
        "queued_s": percentiles([r.queued_s for r in done if r.queued_s is not None]),
        "worker_run_s": percentiles([r.run_s for r in done if r.run_s is not None]),
        "post_ms": percentiles([1000 * r.post_s for r in results if r.state != "error"]),
        "memory_mib": {
            name: {"end": sampler.last.get(name, 0) / mib, "peak": sampler.peak[name] / mib}
            for name in target.memory
        },
        "errors": sorted({r.error for r in results if r.error}),
        "jobs": [asdict(r) for r in results],
    }


# ----------------------------------------------------------------------------- report
def _pair(values: tuple[float, float] | None, unit: str, digits: int) -> str:
    if values is None:
        return "-"
    return f"p50 {values[0]:.{digits}f} {unit}   p95 {values[1]:.{digits}f} {unit}"


def _header(summary: dict[str, Any]) -> None:
    m, s = summary["machine"], summary["settings"]
    print(
        f"# machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPU cores "
        f"({m['usable_cpus']} usable), load average {m['load_average']} at start, "
        f"{summary['load_average_end']} at end; python {m['python']}"
    )
    amount = f"{s['jobs']} jobs" if s["jobs"] is not None else f"{s['duration']} s"
    print(
        f"# settings: {amount}, {s['case']} ({s['upload_kib']:.0f} KiB per upload), "
        f"poll {s['poll']} s, "
        + (
            f"tiling {s['tiling']}, batch {s['batch_size']}, checkpoint {s['checkpoint']}"
            if s["started_here"]
            else "the service's own model and settings"
        )
    )


def report(summary: dict[str, Any]) -> None:
    print(f"# omnet service load test: {summary['mode']}")
    _header(summary)
    r = summary["result"]
    states = ", ".join(f"{n} {state}" for state, n in r["states"].items()) or "none"
    rows = [
        (
            "jobs",
            f"{r['submitted']} submitted by {r['clients']} clients: {states}; "
            f"{r['elapsed_s']:.1f} s",
        ),
        (
            "throughput",
            f"{r['jobs_per_min']:.2f} jobs/min, {r['cases_per_hour']:.0f} cases/hour (succeeded)",
        ),
        ("latency POST->done", _pair(r["latency_s"], "s", 2)),
        ("  queued", _pair(r["queued_s"], "s", 2)),
        ("  worker run", _pair(r["worker_run_s"], "s", 2)),
        ("POST request", _pair(r["post_ms"], "ms", 1)),
    ]
    for name, mem in r["memory_mib"].items():
        rows.append((f"RSS {name}", f"end {mem['end']:.0f} MiB   peak {mem['peak']:.0f} MiB"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for error in r["errors"]:
        print(f"error: {error}")


def _p(values: list[float] | tuple[float, float] | None, index: int) -> str:
    return "-" if values is None else f"{values[index]:.1f}"


def report_matrix(summary: dict[str, Any]) -> None:
    print("# omnet service load test: configurations on one case, one after the other")
    _header(summary)
    header = (
        "configuration",
        "workers x threads",
        "clients",
        "jobs",
        "cases/hour",
        "latency p50 s",
        "p95 s",
        "run p50 s",
        "ratio",
    )
    rows = []
    for run in summary["configurations"]:
        r = run["result"]
        threads = run["threads"] if run["threads"] is not None else "default"
        rows.append(
            (
                run["configuration"],
                f"{run['workers']} x {threads}",
                str(r["clients"]),
                f"{r['states'].get('succeeded', 0)}/{r['submitted']}",
                f"{r['cases_per_hour']:.1f}",
                _p(r["latency_s"], 0),
                _p(r["latency_s"], 1),
                _p(r["worker_run_s"], 0),
                "-" if run["ratio"] is None else f"{run['ratio']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}"
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    for run in summary["configurations"]:
        print(
            f"# {run['configuration']}: {run['mode']}; {run['result']['elapsed_s']:.1f} s, "
            f"load average {run['load_average_end']} at its end"
        )
        for error in run["result"]["errors"]:
            print(f"error ({run['configuration']}): {error}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_argument_group(
        "what to load (one of --embedded, --redis, --url, "
        "--configurations; --redis also names the Redis of "
        "--configurations)"
    )
    mode.add_argument("--embedded", action="store_true", help="start omnet serve (no broker)")
    mode.add_argument("--redis", metavar="URL", help="start an API and workers on this Redis")
    mode.add_argument("--url", help="load a service that is already running")
    mode.add_argument(
        "--configurations",
        nargs="+",
        metavar="CONF",
        help="start each in turn and compare: embedded, embedded-1xT, redis-WxT",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers with --redis")
    parser.add_argument(
        "--threads", type=int, help="OMNET_THREADS of the started workers (default: PyTorch's)"
    )
    parser.add_argument("--redis-db", type=int, default=15, help="database when URL names none")
    parser.add_argument("--api-key", default=None, help="key of the --url service")
    parser.add_argument("--api-pid", type=int, help="API pid of the --url service")
    parser.add_argument("--worker-pid", type=int, action="append", help="worker pid (repeat)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--jobs", type=int, help="jobs to submit in all (default 12)")
    amount.add_argument("--duration", type=float, help="submit for this many seconds")
    parser.add_argument(
        "--clients", type=int, help="concurrent clients (default 2; 2 x workers per configuration)"
    )
    parser.add_argument(
        "--case",
        nargs="?",
        const="",
        metavar="DIR",
        help="upload this BraTS case folder; alone: the first under $OMNET_DATA_DIR/brats2018",
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 48, 32], metavar=("X", "Y", "Z"))
    parser.add_argument("--cases", type=int, default=3, help="distinct phantoms to cycle")
    parser.add_argument(
        "--poll", type=float, help="status poll interval, s (default 0.2; 1 with --case)"
    )
    parser.add_argument("--job-timeout", type=float, default=900.0, help="give up on a job, s")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="serve this checkpoint (default: random network)")
    model.add_argument("--bundled", action="store_true", help="serve the bundled model")
    parser.add_argument("--width", type=int, default=4, help="width of the random network")
    parser.add_argument("--device", default="cpu", help="worker device (started services)")
    parser.add_argument("--tiling", default="wide", choices=["wide", "paper"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    chosen = [args.embedded, bool(args.url), bool(args.configurations)]
    if sum(chosen) + (bool(args.redis) and not args.configurations) != 1:
        parser.error("give one of --embedded, --redis URL, --url URL or --configurations")
    if args.jobs is None and args.duration is None:
        args.jobs = 12
    if args.url and args.api_key is None:
        parser.error("--url needs --api-key")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.poll is None:
        args.poll = 1.0 if args.case is not None else 0.2
    args.matrix = []
    for text in args.configurations or []:
        try:
            args.matrix.append(parse_configuration(text, args.threads))
        except ValueError as exc:
            parser.error(f"--configurations: {exc}")
    if args.configurations and args.redis is None:
        args.redis = "redis://127.0.0.1:6379"
    return args


def load_cases(args: argparse.Namespace, work: Path) -> tuple[list[Case], str] | None:
    """The cases to upload and their description; None when ``--case`` found none."""
    if args.case is None:
        cases = write_cases(work / "cases", tuple(args.shape), args.cases)
        shape = "x".join(map(str, args.shape))
        return cases, f"phantom {shape} ({args.cases} cases)"
    folder = Path(args.case) if args.case else default_case()
    if folder is None:
        return None
    return [read_case(folder)], f"BraTS case {folder.name}"


def single_configuration(args: argparse.Namespace) -> Configuration:
    if args.embedded:
        return Configuration("embedded", "embedded", 1, args.threads)
    threads = args.threads if args.threads is not None else "default"
    return Configuration(f"redis-{args.workers}x{threads}", "redis", args.workers, args.threads)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="omnet-service-load-"))
    runs: list[dict[str, Any]] = []
    try:
        loaded = load_cases(args, work)
        if loaded is None:
            reason = (
                f"skipped: no BraTS case folder under {cases_root()}; pass --case DIR, or set "
                "OMNET_DATA_DIR to the folder that holds brats2018/<case>/"
            )
            print(json.dumps({"skipped": reason}) if args.json else f"# {reason}")
            return
        cases, case_text = loaded
        if args.url:
            with external_service(args) as target:
                result = run_load(target, args, cases, args.clients or 2)
                runs.append({"mode": target.mode, "result": result})
        else:
            checkpoint = resolve_checkpoint(args, work)
            for conf in args.matrix or [single_configuration(args)]:
                folder = work / re.sub(r"[^A-Za-z0-9_.-]", "_", conf.name)
                clients = args.clients or (2 * conf.workers if args.matrix else 2)
                with started_service(args, conf, folder, checkpoint) as target:
                    result = run_load(target, args, cases, clients)
                runs.append(
                    {
                        "configuration": conf.name,
                        "mode": target.mode,
                        "workers": conf.workers,
                        "threads": conf.threads,
                        "load_average_end": [round(x, 2) for x in os.getloadavg()],
                        "result": result,
                    }
                )
    finally:
        if args.keep:
            print(f"# kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    settings = {
        "clients": args.clients,
        "jobs": args.jobs,
        "duration": args.duration,
        "case": case_text,
        "shape": args.shape if args.case is None else None,
        "cases": len(cases),
        "upload_kib": sum(len(b) for _, b in cases[0].values()) / 1024,
        "poll": args.poll,
        "tiling": args.tiling,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": args.threads,
        "checkpoint": None if args.url else describe_checkpoint(args),
        "started_here": not args.url,
    }
    summary: dict[str, Any] = {
        "machine": info,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "settings": settings,
    }
    if args.matrix:
        first = runs[0]["result"]["cases_per_hour"]
        for run in runs:
            run["ratio"] = run["result"]["cases_per_hour"] / first if first > 0 else None
        summary["configurations"] = runs
    else:
        summary.update(mode=runs[0]["mode"], result=runs[0]["result"])
    if args.json:
        print(json.dumps(summary, indent=1))
    elif args.matrix:
        report_matrix(summary)
    else:
        report(summary)


if __name__ == "__main__":
    main()
