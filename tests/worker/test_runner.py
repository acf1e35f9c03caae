"""worker/runner.py: claiming, running, taking over and stopping jobs (in process).

A real SQLite job store and storage folder, a tiny checkpoint and a phantom; no Celery
(tests/service/ runs the real worker processes).
"""

from __future__ import annotations

import shutil
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from model.checkpoint import save_checkpoint
from model.network import ArchConfig, build_model
from model.phantom import write_phantom
from service.config import Settings
from service.db import JobStore, jobs, utcnow
from service.schemas import JobOptions
from service.storage import Storage
from worker import runner
from worker.runner import run_job, worker_name

MODALITIES = ("t1", "t1ce", "t2", "flair")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = ArchConfig(width=4)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", build_model(config), config)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    return write_phantom(tmp_path_factory.mktemp("case"), name="case", shape=(40, 40, 32), seed=5)


@pytest.fixture
def settings(tmp_path, checkpoint, monkeypatch) -> Settings:
    monkeypatch.setattr(runner, "_loaded", None)  # each test loads its own predictor
    return Settings(
        storage_dir=tmp_path / "storage",
        checkpoint=str(checkpoint),
        device="cpu",
        tiling="fast",
        worker_heartbeat_s=0.1,
        stale_after_s=3,
    )


@pytest.fixture
def store(settings) -> JobStore:
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    return JobStore(settings.database)


@pytest.fixture
def storage(settings) -> Storage:
    return Storage(settings.storage_dir)


def _submit(store: JobStore, storage: Storage, case: dict[str, Path], **options: object) -> str:
    job_id = str(uuid.uuid4())
    folder = storage.inputs_dir(job_id)
    folder.mkdir(parents=True)
    inputs = {}
    for name in (*MODALITIES, "reference"):
        dest = folder / f"{name}.nii.gz"
        shutil.copyfile(case["seg" if name == "reference" else name], dest)
        inputs[name] = storage.key(dest)
    opts = JobOptions(**options).model_dump()  # type: ignore[arg-type]
    store.create("alice", opts, inputs, "test.cpu", job_id=job_id)
    return job_id


def _age_heartbeat(store: JobStore, job_id: str, seconds: float) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def test_runs_once_and_records_results(settings, store, storage, case):
    job_id = _submit(store, storage, case, probabilities=True)
    assert run_job(job_id, settings, store, storage) == "succeeded"
    job = store.get(job_id)
    assert job is not None
    assert (job.state, job.attempts, job.worker, job.progress) == (
        "succeeded",
        1,
        worker_name(),
        1.0,
    )
    assert job.model_name == "tiny.pt" and job.expires_at is not None
    assert job.result is not None
    assert set(job.result["files"]) == {"segmentation", "probabilities", "preview", "metrics"}
    for key in job.result["files"].values():
        assert storage.path(key).is_file(), key
    assert set(job.result["metrics"]["reference"]) == {"WT", "TC", "ET"}
    # A second delivery of the same message does nothing.
    assert run_job(job_id, settings, store, storage) == "gone"
    assert store.get(job_id).attempts == 1  # type: ignore[union-attr]


def test_live_claim_is_busy_and_a_stale_one_is_taken_over(settings, store, storage, case):
    job_id = _submit(store, storage, case, preview=False)
    assert store.claim(job_id, "other-host:1", settings.stale_after_s) is not None
    assert run_job(job_id, settings, store, storage) == "busy"
    assert store.get(job_id).attempts == 1  # type: ignore[union-attr]

    _age_heartbeat(store, job_id, settings.stale_after_s + 1)
    assert run_job(job_id, settings, store, storage) == "succeeded"
    job = store.get(job_id)
    assert job is not None and (job.attempts, job.worker) == (2, worker_name())
    # The first worker, should it wake up, learns it lost the job and cannot finish it.
    assert store.heartbeat(job_id, "other-host:1", 0.5, "inference") == "succeeded"
    assert not store.finish(job_id, "other-host:1", "failed", timedelta(hours=1))
    assert store.get(job_id).state == "succeeded"  # type: ignore[union-attr]


def test_cancelled_job_is_never_run(settings, store, storage, case):
    job_id = _submit(store, storage, case)
    assert store.cancel(job_id, "alice", timedelta(hours=1)).state == "cancelled"  # type: ignore[union-attr]
    assert run_job(job_id, settings, store, storage) == "gone"
    job = store.get(job_id)
    assert job is not None and (job.state, job.attempts, job.started_at) == ("cancelled", 0, None)
    assert not storage.outputs_dir(job_id).exists()


def test_inputs_broken_after_submission_fail_with_a_code(settings, store, storage, case):
    job_id = _submit(store, storage, case)
    flair = storage.inputs_dir(job_id) / "flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:500])
    assert run_job(job_id, settings, store, storage) == "failed"
    job = store.get(job_id)
    assert job is not None and job.state == "failed"
    assert job.error_code == "unreadable" and "flair" in (job.error_message or "")


def _run_in_thread(settings, store, storage, job_id) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []
    thread = threading.Thread(
        target=lambda: outcome.append(run_job(job_id, settings, store, storage)), daemon=True
    )
    thread.start()
    return thread, outcome


def _wait_inference(store: JobStore, job_id: str) -> None:
    deadline = utcnow() + timedelta(seconds=60)
    while utcnow() < deadline:
        job = store.get(job_id)
        if job is not None and job.stage == "inference":
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"job {job_id} never reached inference: {store.get(job_id)}")


def test_cancel_while_running_stops_and_deletes(settings, store, storage, case):
    slow = settings.model_copy(update={"tiling": "paper"})
    job_id = _submit(store, storage, case)
    thread, outcome = _run_in_thread(slow, store, storage, job_id)
    _wait_inference(store, job_id)
    store.cancel(job_id, "alice", timedelta(hours=1))
    thread.join(60)
    assert outcome == ["cancelled"]
    job = store.get(job_id)
    assert job is not None and job.state == "cancelled" and job.result is None
    assert not storage.job_dir(job_id).exists()


def test_time_limit_fails_the_job(settings, store, storage, case):
    # A limit already spent when the case is loaded: the first check stops the job.
    slow = settings.model_copy(update={"tiling": "paper", "job_time_limit_s": 0.001})
    job_id = _submit(store, storage, case)
    assert run_job(job_id, slow, store, storage) == "failed"
    job = store.get(job_id)
    assert job is not None and job.error_code == "time_limit_exceeded"
    assert not storage.outputs_dir(job_id).exists()


def test_claim_is_atomic_across_workers(store, storage, case):
    job_id = _submit(store, storage, case)
    claims = [store.claim(job_id, f"w{i}:1", 3.0) for i in range(3)]
    assert [c is not None for c in claims] == [True, False, False]
    with store.engine.connect() as conn:
        attempts = conn.execute(sa.select(jobs.c.attempts).where(jobs.c.id == job_id)).scalar()
    assert attempts == 1
