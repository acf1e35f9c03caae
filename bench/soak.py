"""Soak test of the Redis deployment with workers killed at random: nothing lost, nothing
run twice.

    python bench/soak.py --redis redis://127.0.0.1:6379 [--redis-db 12] [--workers 2]
        [--clients 3] [--minutes 5] [--kill-every 20 60] [--cancel 0.2] [--json out.json]

Starts an API (``omnet serve --no-worker``) and ``--workers`` solo workers on a tiny
random network (the service is under test, not the model), with short liveness
settings (heartbeat 1 s, stale after 3 s, message lease 6 s). ``--clients`` threads
then, for ``--minutes``, each submit a phantom case, and per job either poll it to the
end and download its label map, or cancel it after a random wait (share ``--cancel``),
listing their jobs now and then. Meanwhile a worker, drawn at random, is killed with
SIGKILL every U(``--kill-every``) seconds and a new one started in its place.

When the time is up, submissions stop and every job gets a drain period to finish.
Reported: requests by status code, errors (5xx and transport failures), jobs submitted,
succeeded, failed, cancelled, deleted (the cancel came after the job had finished, so
DELETE removed it), lost (never finished, or gone without a DELETE), and duplicated (a
job whose success was logged by more than one worker run); lost and duplicated must
be 0.
Uses helpers of ``bench/service_load.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import (
    API_KEY,
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


def client_loop(
    base: str, cases: list[dict[str, bytes]], tally: Tally, until: float, cancel: float, seed: int
) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        while time.monotonic() < until:
            case = rng.choice(cases)
            files = {m: (f"{m}.nii.gz", data, "application/gzip") for m, data in case.items()}
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


def killer_loop(
    workers: list[Proc],
    spawn: Any,
    until: float,
    every: tuple[float, float],
    rng: random.Random,
    kills: list[float],
) -> None:
    while True:
        wait = rng.uniform(*every)
        if time.monotonic() + wait >= until:
            return
        time.sleep(wait)
        victim = rng.randrange(len(workers))
        os.killpg(workers[victim].popen.pid, signal.SIGKILL)
        workers[victim].popen.wait()
        kills.append(time.monotonic())
        workers[victim] = spawn()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(20.0, 60.0))
    parser.add_argument("--cancel", type=float, default=0.2)
    parser.add_argument("--drain", type=float, default=120.0, help="seconds to finish after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiling", default="paper", help="paper: jobs of a few seconds, so kills hit them"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    broker = redis_url(args.redis, args.redis_db)
    prefix = f"omnet-soak-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OMNET_")},
            "OMNET_STORAGE_DIR": str(work / "storage"),
            "OMNET_CHECKPOINT": str(random_checkpoint(work / "tiny.pt", 4)),
            "OMNET_API_KEYS": f"{API_KEY}:soak",
            "OMNET_DEVICE": "cpu",
            "OMNET_TILING": args.tiling,
            "OMNET_BROKER_URL": broker,
            "OMNET_QUEUE_PREFIX": prefix,
            "OMP_NUM_THREADS": "1",
            **LIVENESS,
        }
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        procs: list[Proc] = [
            start("api", ["serve", "--no-worker", "--port", str(port)], env, work / "logs")
        ]
        runs = [0]

        def spawn() -> Proc:
            runs[0] += 1
            name = f"worker{runs[0]}"
            proc = start(
                name,
                ["worker", "--pool", "solo", "--device", "cpu", "--name", f"{name}@%h"],
                env,
                work / "logs",
            )
            procs.append(proc)
            return proc

        workers = [spawn() for _ in range(args.workers)]
        try:
            wait_ready(base, args.workers, procs, 180)
            cases = write_cases(work / "cases", (48, 48, 32), 3)
            tally = Tally()
            started = time.monotonic()
            until = started + args.minutes * 60
            kills: list[float] = []
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
                    args=(workers, spawn, until, tuple(args.kill_every), rng, kills),
                )
            )
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            summary = drain_and_count(base, tally, work / "logs", args.drain)
            summary.update(
                minutes=args.minutes,
                clients=args.clients,
                workers=args.workers,
                worker_kills=len(kills),
                requests=dict(tally.statuses),
                errors=tally.errors[:20],
            )
        finally:
            stop(procs)
            delete_redis_keys(broker, prefix)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if summary["lost"] or summary["duplicated"]:
        raise SystemExit("jobs were lost or run twice")


def drain_and_count(base: str, tally: Tally, logs: Path, drain: float) -> dict[str, Any]:
    """Waits up to ``drain`` s for every job to finish; counts outcomes from the API and
    successes per job from every worker log."""
    states: dict[str, str] = {}
    attempts: dict[str, int] = {}
    deadline = time.monotonic() + drain
    with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        while True:
            for job, action in tally.jobs.items():
                if action == "deleted":
                    states[job] = "deleted"
                if states.get(job) in (*FINAL, "deleted"):
                    continue
                answer = http.get(f"/v1/jobs/{job}")
                states[job] = answer.json()["state"] if answer.status_code == 200 else "gone"
                if answer.status_code == 200:
                    attempts[job] = int(answer.json().get("attempts") or 0)
            if all(s in (*FINAL, "deleted") for s in states.values()):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
    successes: Counter[str] = Counter()
    for log in logs.glob("worker*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if ": succeeded" in line and "job " in line and "Task " not in line:
                successes[line.split("job ", 1)[1].split(":", 1)[0]] += 1
    outcome = Counter(states.values())
    return {
        "jobs_submitted": len(tally.jobs),
        "succeeded": outcome["succeeded"],
        "failed": outcome["failed"],
        "cancelled": outcome["cancelled"],
        "deleted_after_finishing": outcome["deleted"],
        "lost": sum(1 for s in states.values() if s not in (*FINAL, "deleted")),
        "duplicated": sum(1 for n in successes.values() if n > 1),
        # Jobs that a kill interrupted (claimed more than once) and that still ended well.
        "taken_over": sum(1 for n in attempts.values() if n > 1),
        # Successes found in the worker logs: equal to "succeeded" when the logs were read
        # right (each success logged once); the duplicate count rests on it.
        "successes_logged": sum(successes.values()),
    }


if __name__ == "__main__":
    main()
