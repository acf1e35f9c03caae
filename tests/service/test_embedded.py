"""Embedded mode: ``omnet serve`` with no broker configured (no Redis, no other server).

The API and its worker exchange messages as files in the storage folder. Results are
kept for a few seconds only here, so the clean-up of expired jobs is seen too. The
worker is a child process of ``omnet serve``, which starts it again when it dies.
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import time
from collections.abc import Iterator
from datetime import datetime

import nibabel as nib
import numpy as np
import pytest

from tests.service.support import (
    SLOW_JOB,
    Api,
    Proc,
    Stack,
    base_env,
    children_of,
    wait_until,
)
from tests.service.support import stack as make_stack

RETENTION_HOURS = 0.002  # 7.2 s


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_checkpoint) -> Iterator[Stack]:
    env = base_env(
        tiny_checkpoint,
        OMNET_RETENTION_HOURS=str(RETENTION_HOURS),
        OMNET_CLEANUP_INTERVAL_S="1",
    )
    with make_stack("embedded", tmp_path_factory.mktemp("embedded"), env) as s:
        s.wait_api(s.start_serve())
        yield s


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    client = deployment.apis[0].client(None)
    wait_until(
        lambda: client.get("/readyz").status_code == 200,
        120,
        "the embedded worker to be ready",
        deployment,
        0.5,
    )
    return deployment.apis[0]


def test_embedded_round_trip(deployment, api, phantom):
    ready = api.client(None).get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "storage": "ok", "broker": "ok", "workers": 1}
    assert "OMNET_BROKER_URL" not in deployment.env

    client = api.client("bob")
    response = client.post("/v1/jobs", files=phantom.files(with_reference=True))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    status = deployment.wait_state(client, job_id, ("succeeded",), timeout=120)
    assert status["attempts"] == 1
    assert "dice" in status["metrics"]["evaluation"]["metrics"]["WT"]

    seg = client.get(f"/v1/jobs/{job_id}/segmentation")
    assert seg.status_code == 200, seg.text
    image = nib.Nifti1Image.from_bytes(gzip.decompress(seg.content))
    assert image.shape == phantom.shape
    np.testing.assert_allclose(image.affine, phantom.affine, atol=1e-4)
    assert set(np.unique(np.asarray(image.dataobj)).tolist()) <= {0, 1, 2, 4}
    # The messages went through the storage folder, not a server.
    assert (deployment.storage / "broker" / "queue").is_dir()


def test_finished_jobs_expire(deployment, api, phantom):
    client = api.client("alice")
    response = client.post("/v1/jobs", files=phantom.files(), data={"preview": "false"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    serve = deployment.procs[0]
    wait_until(
        lambda: f"job {job_id}: succeeded" in serve.output(),
        120,
        "the job to succeed",
        deployment,
    )
    record = deployment.record(job_id)
    if record is not None:  # not purged yet: it expires after the retention period
        assert record.finished_at is not None and record.expires_at is not None
        kept = (record.expires_at - record.finished_at).total_seconds()
        assert kept == pytest.approx(RETENTION_HOURS * 3600, abs=0.01)

    def purged() -> bool:
        return client.get(f"/v1/jobs/{job_id}").status_code == 404

    wait_until(purged, 30, "the expired job to be purged", deployment, 0.5)
    assert client.get(f"/v1/jobs/{job_id}").json()["error"]["code"] == "job_not_found"
    assert deployment.record(job_id) is None
    assert not deployment.job_dir(job_id).exists(), "the expired job's files remain"
    assert client.get("/v1/jobs").json()["total"] == 0
    # Every finished job went: none is left with an expiry in the past.
    assert deployment.store.expired(datetime.max) == []


def _worker_of(serve: Proc) -> int:
    """The pid of the worker that ``omnet serve`` runs (its one child process)."""
    children = wait_until(lambda: children_of(serve.pid), 30, "omnet serve to run a worker")
    assert len(children) == 1, f"omnet serve has {len(children)} child processes: {children}"
    return children[0]


def test_a_killed_worker_is_replaced(deployment, api, phantom):
    """SIGKILL the embedded worker: ``omnet serve`` starts a new one, which runs the job
    submitted meanwhile."""
    serve = api.proc
    client = api.client("bob")
    host = socket.gethostname()
    killed = _worker_of(serve)
    wait_until(
        lambda: f"{host}:{killed}" in {w["name"] for w in deployment.store.live_workers(3.0)},
        120,
        "the embedded worker to register",
        deployment,
    )
    os.kill(killed, signal.SIGKILL)

    response = client.post("/v1/jobs", files=phantom.files(), data={"preview": "false"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    status = deployment.wait_state(client, job_id, ("succeeded",), timeout=120)
    assert status["attempts"] == 1

    assert serve.alive()
    replacement = _worker_of(serve)
    assert replacement != killed
    record = deployment.record(job_id)
    assert record is not None and record.worker == f"{host}:{replacement}"
    live = {w["name"] for w in deployment.store.live_workers(3.0)}
    assert f"{host}:{replacement}" in live
    assert f"the embedded worker (pid {killed}) was killed by SIGKILL; starting a new one" in (
        serve.output()
    )
    # The killed worker's registration ages out: /readyz counts the one live worker.
    wait_until(
        lambda: client.get("/readyz").json()["checks"].get("workers") == 1,
        30,
        "/readyz to count one worker",
        deployment,
        0.5,
    )


#: Liveness of the deployment below: a restarted worker is up well within the stale
#: interval, so the job its predecessor ran still has a recent heartbeat then.
KILLED_HEARTBEAT_S, KILLED_STALE_S = 1.0, 12.0
#: docs/delivery-guarantees.md: a dead worker's running job resumes (or fails) within
#: 2 x (heartbeat + stale interval) of a live worker being there.
KILLED_BOUND_S = 2 * (KILLED_HEARTBEAT_S + KILLED_STALE_S)
#: What a loaded 2-core machine adds: the message's pick-up, the job's first beat.
SLACK_S = 8.0


def _kill_mid_job(s: Stack, serve: Proc, job_id: str, attempt: int) -> tuple[str, float]:
    """SIGKILLs the worker while it runs attempt ``attempt`` of the job; returns the
    killed worker's name and the time its replacement registered."""
    host = socket.gethostname()
    record = wait_until(
        lambda: (r := s.record(job_id)) and r.state == "running" and r.attempts == attempt and r,
        120,
        f"attempt {attempt} of the job to run",
        s,
        0.05,
    )
    killed = _worker_of(serve)
    assert record.worker == f"{host}:{killed}"
    os.kill(killed, signal.SIGKILL)
    replacement = wait_until(
        lambda: [c for c in children_of(serve.pid) if c != killed], 60, "a new worker", s
    )[0]
    wait_until(
        lambda: f"{host}:{replacement}" in {w["name"] for w in s.store.live_workers(3.0)},
        120,
        "the new worker to register",
        s,
        0.1,
    )
    return record.worker, time.monotonic()


def test_a_job_whose_worker_is_killed_resumes_then_fails_with_worker_lost(
    tmp_path, tiny_checkpoint, long_phantom
):
    """SIGKILL the embedded worker mid-job. ``omnet serve`` sees it die and queues the job
    again before starting a replacement (which starts before the job's heartbeat would be
    stale), and the job resumes within the bound. Killed again at its last attempt
    (OMNET_MAX_ATTEMPTS=2), it fails with worker_lost within the same bound."""
    env = base_env(
        tiny_checkpoint,
        OMNET_WORKER_HEARTBEAT_S=str(KILLED_HEARTBEAT_S),
        OMNET_STALE_AFTER_S=str(KILLED_STALE_S),
        OMNET_MAX_ATTEMPTS="2",
        **SLOW_JOB,  # a job of several seconds, to be killed in the middle
    )
    with make_stack("killed", tmp_path, env) as s:
        api = s.wait_api(s.start_serve())
        serve = api.proc
        client = api.client("bob")
        response = client.post("/v1/jobs", files=long_phantom.files(), data={"preview": "false"})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        first, ready_at = _kill_mid_job(s, serve, job_id, attempt=1)
        resumed = wait_until(
            lambda: (r := s.record(job_id)) and r.attempts == 2 and r,
            KILLED_BOUND_S + SLACK_S,
            "the killed worker's job to be taken again",
            s,
            0.2,
        )
        assert time.monotonic() - ready_at <= KILLED_BOUND_S + SLACK_S
        assert resumed.worker != first

        _kill_mid_job(s, serve, job_id, attempt=2)
        status = s.wait_state(client, job_id, ("failed",), timeout=KILLED_BOUND_S + SLACK_S)
        assert status["attempts"] == 2
        assert status["error"]["code"] == "worker_lost", status
        assert "stopped 2 times (attempts 1-2)" in status["error"]["message"]
        assert serve.alive()


def test_a_worker_that_keeps_dying_stops_serve(tmp_path, tiny_checkpoint):
    """A worker that cannot start (an invalid device) is restarted four times, then
    ``omnet serve`` stops its API and exits 1 with one line saying why."""
    env = base_env(tiny_checkpoint, OMNET_DEVICE="no-such-device")
    with make_stack("crashing", tmp_path, env) as s:
        serve = s.start_serve()
        status = serve.proc.popen.wait(timeout=150)
        output = serve.proc.output()
    assert status == 1, output
    assert output.count("device must be 'auto', 'cpu' or 'cuda[:N]'") == 5
    assert output.count("starting a new one in") == 4
    last = output.splitlines()[-1]
    assert last.startswith(
        "omnet serve: error: the embedded worker died 5 times within 60 s (the last one "
        "exited with status 1); stopped the API"
    ), output


def test_start_up_logs_say_where_and_stay_quiet(deployment, api):
    """A newcomer sees where to go, the model and the device, not Celery's banner or
    its warnings."""
    serve = deployment.apis[0].proc
    wait_until(lambda: "ready." in serve.output(), 60, "the worker's ready line", deployment)
    log = serve.output()
    assert "omnet serve: http://localhost:" in log and "/docs" in log
    assert "model " in log and "device " in log
    assert "loaded ['" in log  # the worker says which model it loaded, and on what device
    for noise in ("SecurityWarning", "No hostname was supplied", "-------------- [queues]"):
        assert noise not in log, noise
