"""Reliability of the queue with real processes: no worker, API restarts, a killed worker.

Every test has a deployment of its own on Redis (storage folder, queues, one API process,
no worker yet) and starts the processes it needs: an API with no worker (not ready; a
queued job is cancelled), an API crash and restart with a second API beside it (same
records), a worker that runs a backlog, a slow worker A cancelled or SIGKILLed in the
middle of a job, and a worker B that takes the job over.
"""

from __future__ import annotations

import gzip
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests.service.support import (
    SLOW_JOB,
    Api,
    Phantom,
    Stack,
    queued_messages,
    redis_env,
    wait_until,
)
from tests.service.support import stack as make_stack


@pytest.fixture
def prefix(queue_prefix: str) -> str:
    """The queue prefix of this test only."""
    return f"{queue_prefix}-queue-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def queue(prefix: str) -> str:
    return f"{prefix}.cpu"


@pytest.fixture
def deployment(tmp_path, redis_url, prefix, tiny_checkpoint) -> Iterator[Stack]:
    """A deployment of this test only, with one API process and no worker."""
    with make_stack("queue", tmp_path, redis_env(redis_url, prefix, tiny_checkpoint)) as s:
        s.wait_api(s.start_api("api-1"))
        yield s


def _api(deployment: Stack) -> Api:
    """The newest API process still running."""
    live = [a for a in deployment.apis if a.proc.alive()]
    assert live, f"no API process is running\n{deployment.tails()}"
    return live[-1]


def _submit(api: Api, phantom: Phantom, owner: str = "alice", **headers: str) -> dict[str, Any]:
    response = api.client(owner, **headers).post("/v1/jobs", files=phantom.files())
    assert response.status_code == 202, response.text
    return response.json()


@dataclass(frozen=True)
class Backlog:
    """Jobs submitted while no worker runs."""

    kept: str  # a good case
    broken: str  # passed the API's checks, then broke in storage: the worker must check again
    cancelled: str  # cancelled before any worker ran it


@pytest.fixture
def backlog(deployment: Stack, phantom: Phantom) -> Backlog:
    api = _api(deployment)
    kept, broken, cancelled = (_submit(api, phantom)["id"] for _ in range(3))
    t1 = deployment.job_dir(broken) / "inputs" / "t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:600])
    response = api.client("alice").delete(f"/v1/jobs/{cancelled}")
    assert response.status_code == 200 and response.json()["state"] == "cancelled", response.text
    return Backlog(kept, broken, cancelled)


def _without_links(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k != "links"}


# --------------------------------------------------------------------------- no worker
def test_not_ready_without_a_worker(deployment):
    response = _api(deployment).client(None).get("/readyz")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"]["code"] == "not_ready"
    assert body["checks"] == {"database": "ok", "storage": "ok", "broker": "ok", "workers": 0}


def test_cancel_a_queued_job(deployment, phantom, redis_url, queue):
    client = _api(deployment).client("alice")
    created = _submit(_api(deployment), phantom)
    job_id = created["id"]
    assert (created["state"], created["queue_position"]) == ("queued", 1)
    assert queued_messages(redis_url, queue) == 1
    assert (deployment.job_dir(job_id) / "inputs" / "t1.nii.gz").is_file()

    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    assert not deployment.job_dir(job_id).exists(), "the cancelled job's files remain"
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert (status["state"], status["queue_position"], status["started_at"]) == (
        "cancelled",
        None,
        None,
    )
    no_result = client.get(f"/v1/jobs/{job_id}/segmentation")
    assert no_result.status_code == 409 and no_result.json()["error"]["code"] == "no_result"


# --------------------------------------------------------------------------- API restart
def test_restarted_and_parallel_apis_share_the_records(deployment, phantom, backlog):
    first = _api(deployment)
    alice = first.client("alice")
    job_ids = (backlog.kept, backlog.broken, backlog.cancelled)
    before = {j: _without_links(alice.get(f"/v1/jobs/{j}").json()) for j in job_ids}
    listed = alice.get("/v1/jobs").json()
    assert listed["total"] == 3

    first.proc.kill(signal.SIGKILL)  # a crash, not a shutdown
    second, third = deployment.start_api("api-2"), deployment.start_api("api-3")
    deployment.wait_api(second)
    deployment.wait_api(third)

    for api in (second, third):
        client = api.client("alice")
        for job_id, status in before.items():
            response = client.get(f"/v1/jobs/{job_id}")
            assert response.status_code == 200, response.text
            assert _without_links(response.json()) == status
            assert response.json()["links"]["self"].startswith(api.url)
        items = client.get("/v1/jobs").json()["items"]
        assert [_without_links(i) for i in items] == [_without_links(i) for i in listed["items"]]

    # A job submitted through one API is seen, retried and cancelled through the other.
    created = _submit(third, phantom, **{"Idempotency-Key": "across-apis"})
    retried = _submit(second, phantom, **{"Idempotency-Key": "across-apis"})
    assert retried["id"] == created["id"]
    assert second.client("alice").get("/v1/jobs").json()["total"] == 4
    assert second.client("alice").delete(f"/v1/jobs/{created['id']}").json()["state"] == "cancelled"
    assert third.client("alice").get(f"/v1/jobs/{created['id']}").json()["state"] == "cancelled"
    third.close()
    assert _api(deployment) is second


# --------------------------------------------------------------------------- workers
def test_worker_runs_the_backlog_and_checks_inputs_again(deployment, backlog):
    worker = deployment.start_worker("worker")
    name = deployment.wait_worker(worker)
    api = _api(deployment)
    ready = wait_until(
        lambda: (r := api.client(None).get("/readyz")).status_code == 200 and r,
        30,
        "/readyz to answer 200",
        deployment,
    )
    assert ready.json()["checks"]["workers"] == 1
    assert [w["name"] for w in api.client("alice").get("/v1/model").json()["workers"]] == [name]

    client = api.client("alice")
    kept = deployment.wait_state(client, backlog.kept, ("succeeded",), timeout=120)
    assert kept["attempts"] == 1
    assert client.get(f"/v1/jobs/{backlog.kept}/segmentation").status_code == 200

    broken = deployment.wait_state(client, backlog.broken, ("failed",), timeout=60)
    assert broken["error"]["code"] == "unreadable", broken
    assert "t1" in broken["error"]["message"]
    assert not (deployment.job_dir(backlog.broken) / "outputs").exists()
    no_result = client.get(f"/v1/jobs/{backlog.broken}/segmentation")
    assert no_result.status_code == 409 and no_result.json()["error"]["code"] == "no_result"

    # The job cancelled before any worker ran was dropped, never started.
    wait_until(
        lambda: f"job {backlog.cancelled}: gone" in worker.output(),
        30,
        "the worker to drop the cancelled job",
        deployment,
    )
    record = deployment.record(backlog.cancelled)
    assert record is not None
    assert (record.state, record.attempts, record.worker) == ("cancelled", 0, None)
    assert not deployment.job_dir(backlog.cancelled).exists()


def test_cancel_a_running_job(deployment, long_phantom):
    """The worker notices the cancellation at its next batch and stops; files go."""
    worker_a = deployment.start_worker("worker-a", **SLOW_JOB)
    name_a = deployment.wait_worker(worker_a)
    api = _api(deployment)
    job_id = _submit(api, long_phantom)["id"]
    wait_until(
        lambda: (r := deployment.record(job_id)) and r.state == "running" and r.worker == name_a,
        60,
        "worker A to run the job",
        deployment,
        0.05,
    )
    response = api.client("alice").delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    wait_until(
        lambda: f"job {job_id}: cancelled" in worker_a.output(),
        30,
        "worker A to stop the cancelled job",
        deployment,
    )
    record = deployment.record(job_id)
    assert record is not None
    assert (record.state, record.attempts, record.result) == ("cancelled", 1, None)
    assert not deployment.job_dir(job_id).exists(), "the cancelled job's files remain"
    assert worker_a.alive()


def test_job_of_a_killed_worker_runs_exactly_once(deployment, long_phantom, redis_url, queue):
    worker_a = deployment.start_worker("worker-a", **SLOW_JOB)
    name_a = deployment.wait_worker(worker_a)
    api = _api(deployment)
    job_id = _submit(api, long_phantom)["id"]

    def running_on_a() -> Any:
        record = deployment.record(job_id)
        return record if record and record.state == "running" and record.worker == name_a else None

    claimed = wait_until(running_on_a, 60, "worker A to run the job", deployment, 0.05)
    claimed_at = time.monotonic()
    worker_a.kill(signal.SIGKILL)
    assert worker_a.popen.returncode == -signal.SIGKILL
    record = deployment.record(job_id)
    assert record is not None and record.state == "running" and record.attempts == 1
    assert claimed.attempts == 1

    # A's message is a lease A no longer renews: Redis hands it out again once the
    # visibility timeout has passed, and B takes it.
    time.sleep(max(0.0, 6.5 - (time.monotonic() - claimed_at)))
    worker_b = deployment.start_worker("worker-b")
    name_b = deployment.wait_worker(worker_b)

    status = deployment.wait_state(api.client("alice"), job_id, ("succeeded",), timeout=120)
    assert status["attempts"] == 2
    seg = api.client("alice").get(f"/v1/jobs/{job_id}/segmentation")
    assert seg.status_code == 200
    assert nib.Nifti1Image.from_bytes(gzip.decompress(seg.content)).shape == long_phantom.shape

    wait_until(
        lambda: queued_messages(redis_url, queue) == 0 or None,
        30,
        "the queue to be empty",
        deployment,
    )
    log_b = worker_b.output()
    assert log_b.count(f"job {job_id}: succeeded") == 1, log_b
    assert f"job {job_id}: succeeded" not in worker_a.output()
    record = deployment.record(job_id)
    assert record is not None
    assert (record.state, record.attempts, record.worker) == ("succeeded", 2, name_b)
    outputs = deployment.job_dir(job_id) / "outputs"
    assert (outputs / "segmentation.nii.gz").is_file()
    labels = np.asarray(nib.load(outputs / "segmentation.nii.gz").dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}


def test_stopped_worker_unregisters(deployment):
    worker = deployment.start_worker("worker")
    deployment.wait_worker(worker)
    worker.stop()
    assert worker.popen.returncode == 0, worker.tail()
    response = _api(deployment).client(None).get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["workers"] == 0
