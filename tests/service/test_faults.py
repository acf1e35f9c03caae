"""Fault injection on real processes: killed pool children and workers, a paused or
emptied broker. No job may be lost or succeed twice, and the API must keep answering.

Settings of these deployments (support.base_env): heartbeat 1 s, stale after 3 s,
visibility (message lease) 6 s, so the documented bound for a dead worker's job to
resume, 2 x (heartbeat + stale), is 8 s here. Broker calls of the API give up after
OMNET_BROKER_TIMEOUT_S = 2 s.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.support import SLOW_JOB, Api, Phantom, Proc, Stack, redis_env, wait_until
from tests.service.support import stack as make_stack

HEARTBEAT_S, STALE_S = 1.0, 3.0
BOUND_S = 2 * (HEARTBEAT_S + STALE_S)
BROKER_TIMEOUT_S = 2.0


def _deployment(tmp_path: Path, redis_url: str, tiny_checkpoint: Path, **env: str) -> Stack:
    prefix = f"omnet-faults-{uuid.uuid4().hex[:8]}"
    extra = {"OMNET_BROKER_TIMEOUT_S": str(BROKER_TIMEOUT_S), **env}
    return make_stack("faults", tmp_path, redis_env(redis_url, prefix, tiny_checkpoint, **extra))


@pytest.fixture
def deployment(tmp_path, redis_url, tiny_checkpoint) -> Iterator[Stack]:
    with _deployment(tmp_path, redis_url, tiny_checkpoint) as s:
        s.wait_api(s.start_api("api"))
        yield s


def _submit(api: Api, phantom: Phantom) -> str:
    response = api.client("alice").post("/v1/jobs", files=phantom.files())
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _running_on(deployment: Stack, job_id: str, worker: str | None = None) -> Any:
    record = deployment.record(job_id)
    if record is None or record.state != "running":
        return None
    return record if worker is None or record.worker == worker else None


def _successes(procs: list[Proc], job_id: str) -> int:
    return sum(p.output().count(f"job {job_id}: succeeded") for p in procs)


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


# --------------------------------------------------------------------------- workers
@pytest.fixture(scope="module")
def half_checkpoint(tmp_path_factory) -> Path:
    """A width-16 half-precision checkpoint (random weights). Loading it converts large
    tensors to float32, which starts PyTorch's OpenMP threads in the loading process,
    as loading the bundled model does; the tiny test model's tensors are too small."""
    import torch

    from model.net.checkpoint import save_checkpoint
    from model.net.network import ArchConfig, build_model

    torch.manual_seed(0)
    config = ArchConfig(width=16)
    path = tmp_path_factory.mktemp("half") / "half16.pt"
    return save_checkpoint(path, build_model(config), config, half=True).resolve()


def test_a_killed_pool_child_is_replaced_and_the_job_succeeds_once(
    tmp_path, redis_url, tiny_checkpoint, database_url, phantom, long_phantom, half_checkpoint
):
    """On each job database: the replacement child is forked from a parent whose threads
    use the database all the time, and must claim the job at once."""
    env = {} if database_url.startswith("sqlite") else {"OMNET_DATABASE_URL": database_url}
    with _deployment(tmp_path, redis_url, tiny_checkpoint, **env) as deployment:
        deployment.wait_api(deployment.start_api("api"))
        _kill_a_pool_child(deployment, (long_phantom, phantom), half_checkpoint)


def _kill_a_pool_child(
    deployment: Stack, phantoms: tuple[Phantom, Phantom], half_checkpoint: Path
) -> None:
    """Kills the pool child running a long job; the job runs again, and a short one after."""
    long_phantom, phantom = phantoms
    model = {"OMNET_CHECKPOINT": str(half_checkpoint), "OMP_NUM_THREADS": "2"}
    worker = deployment.start_worker("prefork", pool="prefork", **SLOW_JOB, **model)
    deployment.wait_worker(worker)
    api = deployment.apis[0]
    job_id = _submit(api, long_phantom)
    record = wait_until(
        lambda: _running_on(deployment, job_id), 60, "the job to run", deployment, 0.05
    )
    child = int(record.worker.rsplit(":", 1)[1])  # the pool process running it
    assert child in _children(worker.pid), "the job should run in a pool child"
    os.kill(child, signal.SIGKILL)
    killed_at = time.monotonic()

    status = deployment.wait_state(api.client("alice"), job_id, ("succeeded",), timeout=120)
    resumed = deployment.record(job_id)
    assert resumed is not None and resumed.worker != record.worker
    assert status["attempts"] == 2
    assert _successes([worker], job_id) == 1
    assert worker.alive()
    # A new child serves the next job too (the first replacement did not hang).
    second = _submit(api, phantom)
    deployment.wait_state(api.client("alice"), second, ("succeeded",), timeout=120)
    assert time.monotonic() - killed_at < 120


def test_a_job_that_keeps_killing_its_pool_child_fails_with_worker_lost(
    tmp_path, redis_url, tiny_checkpoint, phantom, long_phantom
):
    """The out-of-memory killer ends every pool child the case runs on: after
    OMNET_MAX_ATTEMPTS starts the job fails with worker_lost, within the take-over bound
    of the last death, and the worker keeps serving."""
    max_attempts = 2
    env = {"OMNET_MAX_ATTEMPTS": str(max_attempts)}
    with _deployment(tmp_path, redis_url, tiny_checkpoint, **env) as deployment:
        api = deployment.wait_api(deployment.start_api("api"))
        worker = deployment.start_worker("prefork", pool="prefork", **SLOW_JOB)
        deployment.wait_worker(worker)
        job_id = _submit(api, long_phantom)
        for attempt in range(1, max_attempts + 1):
            record = wait_until(
                lambda n=attempt: (r := _running_on(deployment, job_id)) and r.attempts == n and r,
                60,
                f"attempt {attempt} of the job to run",
                deployment,
                0.05,
            )
            child = int(record.worker.rsplit(":", 1)[1])
            assert child in _children(worker.pid), "the job should run in a pool child"
            os.kill(child, signal.SIGKILL)
        killed_at = time.monotonic()

        client = api.client("alice")
        status = deployment.wait_state(client, job_id, ("failed",), timeout=60)
        assert time.monotonic() - killed_at <= BOUND_S + 3
        assert status["attempts"] == max_attempts
        assert status["error"]["code"] == "worker_lost", status
        assert "stopped 2 times (attempts 1-2)" in status["error"]["message"]
        assert _successes([worker], job_id) == 0
        assert worker.alive()
        # The next case is served as usual.
        deployment.wait_state(client, _submit(api, phantom), ("succeeded",), timeout=120)
        assert client.get(f"/v1/jobs/{job_id}").json()["attempts"] == max_attempts


@pytest.mark.parametrize("recovery", ["restart", "second_worker"])
def test_jobs_of_a_killed_worker_run_once(deployment, long_phantom, recovery):
    """One running and two queued jobs when the worker's main process is SIGKILLed. A runs
    them slowly, so that it dies in the middle of one; B, with the default settings, runs
    the same cases in a fraction of the time, so that its own jobs do not hold up the
    take-over whose bound the test checks."""
    api = deployment.apis[0]
    worker_a = deployment.start_worker("worker-a", **SLOW_JOB)
    name_a = deployment.wait_worker(worker_a)
    workers = [worker_a]
    if recovery == "second_worker":
        # B shares the queue with A from the start, then takes over A's jobs.
        worker_b = deployment.start_worker("worker-b")
        deployment.wait_worker(worker_b)
        workers.append(worker_b)
    jobs = [_submit(api, long_phantom) for _ in range(3 if recovery == "restart" else 4)]
    running = wait_until(
        lambda: next((j for j in jobs if _running_on(deployment, j, name_a)), None),
        60,
        "worker A to run a job",
        deployment,
        0.05,
    )
    worker_a.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    if recovery == "restart":
        worker_b = deployment.start_worker("worker-b")
        deployment.wait_worker(worker_b)
        workers.append(worker_b)
    ready_at = time.monotonic()

    def resumed() -> Any:
        record = deployment.record(running)
        return record if record and record.worker != name_a else None

    wait_until(resumed, 60, "A's running job to be taken over", deployment, 0.1)
    # Within the bound, counted from when a live worker was there to take it.
    assert time.monotonic() - max(killed_at, ready_at) <= BOUND_S + 3
    client = api.client("alice")
    for job_id in jobs:
        status = deployment.wait_state(client, job_id, ("succeeded",), timeout=180)
        assert _successes(workers, job_id) == 1, job_id
        assert status["attempts"] == (2 if job_id == running else 1), job_id


# --------------------------------------------------------------------------- broker
@pytest.fixture
def private_broker(tmp_path, tiny_checkpoint) -> Iterator[tuple[Stack, Proc]]:
    """A deployment on its own redis-server, which a test may pause or empty."""
    with _deployment(tmp_path, "redis://unused", tiny_checkpoint) as s:
        redis_proc, url = s.start_redis()
        s.env["OMNET_BROKER_URL"] = url
        s.wait_api(s.start_api("api"))
        try:
            yield s, redis_proc
        finally:
            os.killpg(redis_proc.pid, signal.SIGCONT)


def test_a_paused_broker_does_not_freeze_the_api(private_broker, phantom):
    deployment, redis_proc = private_broker
    api = deployment.apis[0]
    client = api.client("alice")
    existing = _submit(api, phantom)
    jobs_before = client.get("/v1/jobs").json()["total"]
    folders_before = sorted(p.name for p in (deployment.storage / "jobs").iterdir())

    os.killpg(redis_proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        quick = httpx.get(f"{api.url}/healthz", timeout=BROKER_TIMEOUT_S * 4)
        # Well within the broker's timeout: nothing waits on the broker (the bound is a
        # setting's, not an idle machine's; a loaded one answers in a fraction of it).
        assert quick.status_code == 200 and time.monotonic() - started < BROKER_TIMEOUT_S

        started = time.monotonic()
        refused = client.post("/v1/jobs", files=phantom.files(), timeout=30)
        waited = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "queue_unavailable"
        # The broker's timeout and the upload's own work (seconds on a loaded machine),
        # far below the client's 30 s: the API gave up on the broker, it did not hang.
        assert waited <= BROKER_TIMEOUT_S + 10, waited

        # Reads answer while the broker hangs; the refused job left nothing behind.
        assert client.get(f"/v1/jobs/{existing}").json()["state"] == "queued"
        assert client.get("/v1/jobs").json()["total"] == jobs_before
        assert sorted(p.name for p in (deployment.storage / "jobs").iterdir()) == folders_before
        started = time.monotonic()
        not_ready = api.client(None).get("/readyz", timeout=30)
        assert not_ready.status_code == 503 and time.monotonic() - started <= 10
    finally:
        os.killpg(redis_proc.pid, signal.SIGCONT)

    after = wait_until(
        lambda: (r := client.post("/v1/jobs", files=phantom.files())).status_code == 202 and r,
        30,
        "a submission to be accepted again",
        deployment,
    )
    worker = deployment.start_worker("worker")
    deployment.wait_worker(worker)
    for job_id in (existing, after.json()["id"]):
        deployment.wait_state(client, job_id, ("succeeded",), timeout=120)


def test_jobs_whose_messages_vanished_are_sent_again(private_broker, phantom):
    """A broker restart without persistence loses every message; the records keep the
    jobs, and the workers send them again."""
    deployment, _ = private_broker
    api = deployment.apis[0]
    jobs = [_submit(api, phantom) for _ in range(2)]
    import redis

    broker = redis.Redis.from_url(deployment.env["OMNET_BROKER_URL"])
    broker.flushall()  # what a restart without persistence leaves
    broker.close()
    worker = deployment.start_worker("worker")
    deployment.wait_worker(worker)
    client = api.client("alice")
    for job_id in jobs:
        status = deployment.wait_state(client, job_id, ("succeeded",), timeout=60)
        assert status["attempts"] == 1
        assert f"job {job_id} (queued) had no message left" in worker.output()
        assert _successes([worker], job_id) == 1


# --------------------------------------------------------------------------- database
#: How long the job database's write lock is held by another connection.
LOCK_S = 8.0
#: /healthz must answer within this while the lock is held (a loaded 2-core machine
#: answers in milliseconds; a blocked event loop would wait out the lock).
HEALTHZ_BOUND_S = LOCK_S / 4


def _hold_write_lock(database: Path, seconds: float) -> threading.Thread:
    """Another writer: takes the SQLite database's write lock and holds it ``seconds``
    (in a thread of its own, so the lock goes whatever the test waits for)."""
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(database, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock, until ROLLBACK
            locked.set()
            time.sleep(seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert locked.wait(10), "the write lock could not be taken"
    return thread


def test_a_locked_database_does_not_block_the_event_loop(deployment, phantom):
    """A submission waiting for the SQLite write lock (another writer holds it) waits in
    a thread: /healthz keeps answering at once, and the submission goes through when the
    lock is released."""
    api = deployment.apis[0]
    client = api.client("alice")
    jobs_dir = deployment.storage / "jobs"
    locker = _hold_write_lock(deployment.storage / "jobs.sqlite", LOCK_S)
    answer: list[httpx.Response] = []
    post = threading.Thread(
        target=lambda: answer.append(client.post("/v1/jobs", files=phantom.files())),
        daemon=True,
    )
    post.start()
    # The case is stored under its job id just before the record is written.
    wait_until(
        lambda: jobs_dir.is_dir() and any(jobs_dir.iterdir()),
        LOCK_S / 2,
        "the submission's files to be stored",
        deployment,
        0.02,
    )
    slowest = 0.0
    while locker.is_alive():
        started = time.monotonic()
        health = httpx.get(f"{api.url}/healthz", timeout=LOCK_S * 4)
        slowest = max(slowest, time.monotonic() - started)
        assert health.status_code == 200
        time.sleep(0.1)
    assert slowest < HEALTHZ_BOUND_S, f"/healthz took {slowest:.2f} s under a held lock"
    post.join(30)
    assert answer and answer[0].status_code == 202, answer and answer[0].text
