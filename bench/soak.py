"""Soak test with workers killed at random: nothing lost, nothing run twice, a killed
job resumed ahead of the backlog, and a case that kills its worker every time fails.

    python bench/soak.py [--mode redis|embedded] [--redis redis://127.0.0.1:6379]
        [--redis-db 12] [--workers 2] [--pool solo|prefork] [--clients 3] [--minutes 5]
        [--kill-every 20 60] [--cancel 0.2] [--poison 1] [--max-attempts 2]
        [--json out.json] [--keep DIR]

``--mode redis`` (the default) starts an API (``omnet serve --no-worker``) and
``--workers`` workers on Redis, solo or (``--pool prefork``) prefork with one pool
process; ``--mode embedded`` starts ``omnet serve`` alone (API and its one worker,
messages as files, no broker). Both run a tiny random network
(the service is under test, not the model), with short liveness settings (heartbeat
1 s, stale after 3 s, message lease 6 s). ``--clients`` threads then, for ``--minutes``,
each submit a phantom case, and per job either poll it to the end and download its
label map, or cancel it after a random wait (share ``--cancel``), listing their jobs now
and then. Meanwhile a worker process is killed with SIGKILL every U(``--kill-every``)
seconds: on Redis one drawn at random, a solo worker (a new one is started in its place)
or a prefork worker's pool process (the pool starts a new one); in embedded mode the
worker of ``omnet serve``, which starts a new one itself (a kill is skipped when two
came within the last minute, so that ``omnet serve``'s limit of 5 worker exits a minute
is not what the soak measures).

``--poison`` cases, submitted at even intervals, play a case that kills its worker
every time (what the out-of-memory killer does to a case too large for the worker): the
process running such a job is SIGKILLed at each of its starts. With
``OMNET_MAX_ATTEMPTS`` = ``--max-attempts`` each must end ``failed`` with
``worker_lost`` after that many starts, while the other jobs succeed.

When the time is up, submissions stop and every job gets a drain period to finish.
Reported: requests by status code, errors (5xx and transport failures), jobs submitted,
succeeded, failed, cancelled, deleted (the cancel came after the job had finished, so
DELETE removed it), lost (never finished, or gone without a DELETE), duplicated (a job
whose success was logged by more than one worker run), unexpected failures (failed jobs
other than the poison cases), the poison cases' outcome, how long each job that a kill
interrupted took to start again (``resumed_s``, from the kill, read from the job
records), ``overtaken``: the jobs submitted after such a job that started between the
kill and its new start (0 expected where a process saw the death: the embedded mode;
on Redis other workers go on meanwhile, for about a second until a prefork pool notices
its child's death, or until a dead solo worker's message lease and heartbeat expire),
and the API process's memory (peak RSS as the kernel counts it, sampled peak, and the
RSS at the end). Lost, duplicated and unexpected failures must be 0 and every poison
case must fail with ``worker_lost``, or the exit status is 1. ``--keep DIR`` keeps the
logs and the job database. Uses helpers of ``bench/service_load.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import (
    API_KEY,
    Case,
    MemorySampler,
    Proc,
    delete_redis_keys,
    free_port,
    random_checkpoint,
    redis_url,
    start,
    stop,
    wait_ready,
    write_cases,
)

FINAL = ("succeeded", "failed", "cancelled")
LIVENESS = {
    "OMNET_WORKER_HEARTBEAT_S": "1",
    "OMNET_STALE_AFTER_S": "3",
    "OMNET_VISIBILITY_TIMEOUT_S": "6",
}


class Tally:
    """Thread-safe counters of requests and the jobs each client submitted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[str] = Counter()
        self.errors: list[str] = []
        self.jobs: dict[str, str] = {}  # id -> what the client did (polled / cancelled)

    def request(
        self, http: httpx.Client, method: str, url: str, **kw: Any
    ) -> httpx.Response | None:
        try:
            response = http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            with self.lock:
                self.statuses["transport error"] += 1
                self.errors.append(f"{method} {url}: {type(exc).__name__}: {exc}")
            return None
        with self.lock:
            self.statuses[str(response.status_code)] += 1
            if response.status_code >= 500:
                self.errors.append(f"{method} {url}: {response.status_code} {response.text[:200]}")
        return response


def upload(case: Case) -> dict[str, tuple[str, bytes, str]]:
    """The multipart files of a case."""
    return {m: (name, data, "application/gzip") for m, (name, data) in case.items()}


def client_loop(
    base: str, cases: list[Case], tally: Tally, until: float, cancel: float, seed: int
) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        while time.monotonic() < until:
            case = rng.choice(cases)
            files = upload(case)
            answer = tally.request(http, "POST", "/v1/jobs", files=files)
            if answer is None or answer.status_code != 202:
                time.sleep(1.0)
                continue
            job = answer.json()["id"]
            if rng.random() < cancel:
                time.sleep(rng.uniform(0.0, 3.0))
                gone = tally.request(http, "DELETE", f"/v1/jobs/{job}")
                with tally.lock:
                    # 200: cancelled while queued or running; 204: it had finished, and
                    # DELETE removed it (its record is gone on purpose).
                    finished = gone is not None and gone.status_code == 204
                    tally.jobs[job] = "deleted" if finished else "cancelled"
                continue
            with tally.lock:
                tally.jobs[job] = "polled"
            while time.monotonic() < until + 120:
                time.sleep(0.5)
                status = tally.request(http, "GET", f"/v1/jobs/{job}")
                if status is not None and status.json().get("state") in FINAL:
                    if status.json()["state"] == "succeeded":
                        tally.request(http, "GET", f"/v1/jobs/{job}/segmentation")
                    break
            if rng.random() < 0.3:
                tally.request(http, "GET", "/v1/jobs", params={"limit": 20})


class Records:
    """The deployment's job records, read from its SQLite job database: what the API does
    not show (the process running a job, the times of its starts)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, dict[str, Any]]:
        """Job id -> state, attempts, worker, created_at, started_at (as stored: UTC)."""
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            rows = conn.execute(
                "SELECT id, state, attempts, worker, created_at, started_at FROM jobs"
            ).fetchall()
        except sqlite3.Error:
            return {}
        finally:
            conn.close()
        keys = ("state", "attempts", "worker", "created_at", "started_at")
        return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}


def utc_now() -> str:
    """Now as the job database stores times (naive UTC, ISO format)."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")


class Deployment:
    """The worker processes of the soak and how to kill them.

    ``redis``: solo workers (a killed one is replaced by a new process) or prefork ones
    (the pool child running a job is killed; the pool starts a new one). ``embedded``:
    the worker of ``omnet serve`` (which starts a new one)."""

    def __init__(
        self, mode: str, pool: str, serve: Proc | None, spawn: Callable[[], Proc], count: int
    ) -> None:
        self.mode, self.pool, self.serve, self.spawn = mode, pool, serve, spawn
        self.workers: list[Proc] = [spawn() for _ in range(count)] if mode == "redis" else []
        self.lock = threading.Lock()
        self.kill_times: deque[float] = deque()
        self.kills: Counter[str] = Counter()
        #: Jobs a kill interrupted: job id, its attempts then, when (monotonic, and UTC
        #: as the records keep times), and what killed it.
        self.interrupted: list[dict[str, Any]] = []

    def processes(self) -> list[int]:
        """The pids that run jobs: solo workers, pool children, the embedded worker."""
        if self.mode == "embedded":
            assert self.serve is not None
            return _children(self.serve.popen.pid)
        if self.pool == "prefork":
            return [c for w in self.workers for c in _children(w.popen.pid)]
        return [w.popen.pid for w in self.workers]

    def recent_kills(self, window_s: float = 60.0) -> int:
        now = time.monotonic()
        while self.kill_times and self.kill_times[0] < now - window_s:
            self.kill_times.popleft()
        return len(self.kill_times)

    def kill(self, pid: int, records: Records, why: str) -> None:
        """SIGKILLs process ``pid`` (and replaces it when nothing else will), noting the
        job it was running."""
        name = f"{socket.gethostname()}:{pid}"
        with self.lock:
            running = [
                (job, r["attempts"])
                for job, r in records.read().items()
                if r["state"] == "running" and r["worker"] == name
            ]
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            now = time.monotonic()
            self.kill_times.append(now)
            self.kills[why] += 1
            for job, attempts in running:
                self.interrupted.append(
                    {"job": job, "attempts": attempts, "at": now, "utc": utc_now(), "by": why}
                )
            for i, worker in enumerate(self.workers):
                if worker.popen.pid == pid:  # a solo worker: nothing else restarts it
                    worker.popen.wait()
                    self.workers[i] = self.spawn()


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, whichever of its threads started them (``omnet
    serve`` starts a new worker from a thread of its own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def killer_loop(
    deployment: Deployment,
    records: Records,
    until: float,
    every: tuple[float, float],
    rng: random.Random,
) -> None:
    """Kills a worker process every U(``every``) s until ``until``."""
    while True:
        wait = rng.uniform(*every)
        if time.monotonic() + wait >= until:
            return
        time.sleep(wait)
        # omnet serve gives up after 5 worker exits within 60 s; the soak stays below.
        if deployment.mode == "embedded" and deployment.recent_kills() >= 2:
            continue
        pids = deployment.processes()
        if pids:
            deployment.kill(rng.choice(pids), records, "random")


def poison_loop(
    base: str,
    case: Case,
    deployment: Deployment,
    records: Records,
    tally: Tally,
    times: list[float],
    deadline: float,
) -> None:
    """Submits a case at each of ``times`` and kills the process running it at every
    start, until it has ended (or ``deadline``)."""
    pending: list[str] = []
    killed: set[tuple[str, int]] = set()
    files = upload(case)
    with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        while time.monotonic() < deadline and (times or pending):
            if times and time.monotonic() >= times[0]:
                times.pop(0)
                answer = tally.request(http, "POST", "/v1/jobs", files=files)
                if answer is not None and answer.status_code == 202:
                    pending.append(answer.json()["id"])
                    with tally.lock:
                        tally.jobs[pending[-1]] = "poison"
            now = records.read()
            for job in list(pending):
                record = now.get(job)
                if record is None or record["state"] in FINAL:
                    pending.remove(job)
                elif record["state"] == "running" and (job, record["attempts"]) not in killed:
                    killed.add((job, record["attempts"]))
                    pid = int(str(record["worker"]).rsplit(":", 1)[1])
                    deployment.kill(pid, records, "poison")
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=["redis", "embedded"], default="redis")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2, help="Redis mode")
    parser.add_argument("--pool", choices=["solo", "prefork"], default="solo", help="Redis mode")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(20.0, 60.0))
    parser.add_argument("--cancel", type=float, default=0.2)
    parser.add_argument("--poison", type=int, default=1, help="cases that kill every worker")
    parser.add_argument("--max-attempts", type=int, default=2, help="OMNET_MAX_ATTEMPTS")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds to finish after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiling", default="paper", help="paper: jobs of a few seconds, so kills hit them"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--keep", type=Path, help="work in this new folder and keep it (logs, job database)"
    )
    args = parser.parse_args()

    rng = random.Random(args.seed)
    broker = redis_url(args.redis, args.redis_db) if args.mode == "redis" else None
    prefix = f"omnet-soak-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        (work / "logs").mkdir(parents=True)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OMNET_")},
            "OMNET_STORAGE_DIR": str(work / "storage"),
            "OMNET_CHECKPOINT": str(random_checkpoint(work / "tiny.pt", 4)),
            "OMNET_API_KEYS": f"{API_KEY}:soak",
            "OMNET_DEVICE": "cpu",
            "OMNET_TILING": args.tiling,
            "OMNET_MAX_ATTEMPTS": str(args.max_attempts),
            "OMP_NUM_THREADS": "1",
            **LIVENESS,
        }
        if broker is not None:
            env.update(OMNET_BROKER_URL=broker, OMNET_QUEUE_PREFIX=prefix)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        serve_args = ["serve", "--port", str(port)]
        if args.mode == "redis":
            serve_args.append("--no-worker")
        api = start("api", serve_args, env, work / "logs")
        procs: list[Proc] = [api]
        runs = [0]

        def spawn() -> Proc:
            runs[0] += 1
            name = f"worker{runs[0]}"
            cmd = ["worker", "--pool", args.pool, "--device", "cpu", "--name", f"{name}@%h"]
            proc = start(name, cmd, env, work / "logs")
            procs.append(proc)
            return proc

        workers = args.workers if args.mode == "redis" else 1
        deployment = Deployment(args.mode, args.pool, api, spawn, workers)
        records = Records(work / "storage" / "jobs.sqlite")
        memory = MemorySampler({"api": [api.popen.pid]}, interval=1.0)
        try:
            wait_ready(base, workers, procs, 180)
            memory.start()
            cases = write_cases(work / "cases", (48, 48, 32), 3)
            # Larger, so that its run lasts long enough (seconds) to be killed in.
            [poison_case] = write_cases(work / "poison", (96, 96, 64), 1)
            tally = Tally()
            started = time.monotonic()
            until = started + args.minutes * 60
            step = args.minutes * 60 / (args.poison + 1)
            poison_times = [started + step * (i + 1) for i in range(args.poison)]
            threads = [
                threading.Thread(
                    target=client_loop,
                    args=(base, cases, tally, until, args.cancel, args.seed * 100 + i),
                )
                for i in range(args.clients)
            ]
            threads.append(
                threading.Thread(
                    target=killer_loop,
                    args=(deployment, records, until, tuple(args.kill_every), rng),
                )
            )
            threads.append(
                threading.Thread(
                    target=poison_loop,
                    args=(
                        base,
                        poison_case,
                        deployment,
                        records,
                        tally,
                        poison_times,
                        until + args.drain,
                    ),
                )
            )
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            logs = [work / "logs" / ("api.log" if args.mode == "embedded" else "worker*.log")]
            summary = drain_and_count(base, tally, logs, args.drain)
            summary.update(recovery(deployment, records.read()))
            memory.stop()
            mib = 2**20
            summary.update(
                mode=args.mode if args.mode == "embedded" else f"redis, {args.pool} workers",
                minutes=args.minutes,
                clients=args.clients,
                workers=workers,
                worker_kills=deployment.kills["random"],
                poison_kills=deployment.kills["poison"],
                api_memory_mib={
                    "peak_rss": round(peak_rss(api.popen.pid) / mib, 1),
                    "peak_sampled": round(memory.peak["api"] / mib, 1),
                    "end": round(memory.last.get("api", 0) / mib, 1),
                },
                requests=dict(tally.statuses),
                errors=tally.errors[:20],
            )
        finally:
            stop(procs)
            if broker is not None:
                delete_redis_keys(broker, prefix)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    poison = summary["poison"]
    wrong = [p for p in poison if (p["state"], p["error"]) != ("failed", "worker_lost")]
    if summary["lost"] or summary["duplicated"] or summary["unexpected_failures"] or wrong:
        raise SystemExit("jobs were lost, run twice or failed, or a poison case did not fail")


def peak_rss(pid: int) -> int:
    """The peak resident memory of a live process, as the kernel counts it (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def recovery(deployment: Deployment, now: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How the jobs that a kill interrupted came back: seconds from the kill to their next
    start (as recorded: UTC), and the jobs submitted after them that started first."""
    resumed: list[float] = []
    overtaken = 0

    def at(text: str | None) -> datetime | None:
        return datetime.fromisoformat(str(text)) if text else None

    for kill in deployment.interrupted:
        job = now.get(kill["job"])
        if job is None or job["attempts"] != kill["attempts"] + 1 or not job["started_at"]:
            continue  # deleted, not started again (failed at its last attempt), killed again
        killed_at, restarted = at(kill["utc"]), at(job["started_at"])
        assert killed_at is not None and restarted is not None
        resumed.append(round((restarted - killed_at).total_seconds(), 2))
        created = at(job["created_at"])
        for other in now.values():
            first = at(other["started_at"]) if other["attempts"] == 1 else None
            later = (at(other["created_at"]) or killed_at) > (created or killed_at)
            if first is not None and later and killed_at < first < restarted:
                overtaken += 1
    return {
        "interrupted": len(deployment.interrupted),
        "resumed_s": {
            "count": len(resumed),
            "median": statistics.median(resumed) if resumed else None,
            "max": max(resumed) if resumed else None,
        },
        "overtaken": overtaken,
    }


def drain_and_count(base: str, tally: Tally, logs: list[Path], drain: float) -> dict[str, Any]:
    """Waits up to ``drain`` s for every job to finish; counts outcomes from the API and
    successes per job from the worker logs (``logs``: paths, or patterns of them)."""
    states: dict[str, str] = {}
    attempts: dict[str, int] = {}
    errors: dict[str, str | None] = {}
    deadline = time.monotonic() + drain
    with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        while True:
            for job, action in list(tally.jobs.items()):
                if action == "deleted":
                    states[job] = "deleted"
                if states.get(job) in (*FINAL, "deleted"):
                    continue
                answer = http.get(f"/v1/jobs/{job}")
                states[job] = answer.json()["state"] if answer.status_code == 200 else "gone"
                if answer.status_code == 200:
                    attempts[job] = int(answer.json().get("attempts") or 0)
                    errors[job] = (answer.json().get("error") or {}).get("code")
            if all(s in (*FINAL, "deleted") for s in states.values()):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
    successes: Counter[str] = Counter()
    for pattern in logs:
        for log in pattern.parent.glob(pattern.name):
            for line in log.read_text(errors="replace").splitlines():
                if ": succeeded" in line and "job " in line and "Task " not in line:
                    successes[line.split("job ", 1)[1].split(":", 1)[0]] += 1
    outcome = Counter(states.values())
    poison = [j for j, action in tally.jobs.items() if action == "poison"]
    return {
        "jobs_submitted": len(tally.jobs),
        "succeeded": outcome["succeeded"],
        "failed": outcome["failed"],
        "cancelled": outcome["cancelled"],
        "deleted_after_finishing": outcome["deleted"],
        "lost": sum(1 for s in states.values() if s not in (*FINAL, "deleted")),
        "duplicated": sum(1 for n in successes.values() if n > 1),
        "unexpected_failures": sum(
            1 for j, s in states.items() if s == "failed" and j not in poison
        ),
        "poison": [
            {"state": states.get(j), "error": errors.get(j), "attempts": attempts.get(j)}
            for j in poison
        ],
        # Jobs that a kill interrupted (claimed more than once) and that still ended well.
        "taken_over": sum(
            1 for j, n in attempts.items() if n > 1 and j not in poison and states[j] != "failed"
        ),
        # Successes found in the worker logs: equal to "succeeded" when the logs were read
        # right (each success logged once); the duplicate count rests on it.
        "successes_logged": sum(successes.values()),
    }


if __name__ == "__main__":
    main()
