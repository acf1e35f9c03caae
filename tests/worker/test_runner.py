"""worker/runner.py: claiming, running, taking over and stopping jobs (in process).

A real SQLite job store and storage folder, a tiny checkpoint and a phantom; no Celery
(tests/service/ runs the real worker processes).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch
from pydantic import SecretStr

from model.io.phantom import write_phantom
from model.io.volumes import InputError
from model.net.checkpoint import save_checkpoint
from model.net.network import ArchConfig, build_model
from service.config import Settings
from service.db import JobState, JobStore, jobs, utcnow
from service.schemas import JobOptions
from service.storage import OUTPUT_FILES, Storage
from tests.service.support import status_server
from worker import runner
from worker.runner import RunOutcome, run_job, worker_name

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
        tiling="wide",
        worker_heartbeat_s=0.1,
        stale_after_s=3,
    )


@pytest.fixture
def store(settings, database_url) -> Iterator[JobStore]:
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(database_url)
    yield store
    store.engine.dispose()


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
    assert run_job(job_id, settings, store, storage) == RunOutcome.SUCCEEDED
    job = store.get(job_id)
    assert job is not None
    assert (job.state, job.attempts, job.worker, job.progress) == (
        JobState.SUCCEEDED,
        1,
        worker_name(),
        1.0,
    )
    assert job.model_name == "tiny.pt" and job.expires_at is not None
    assert job.result is not None
    assert set(job.result["files"]) == {"segmentation", "probabilities", "preview", "metrics"}
    for key in job.result["files"].values():
        assert storage.path(key).is_file(), key
    assert set(job.result["metrics"]["evaluation"]["metrics"]) == {"WT", "TC", "ET"}
    # A second delivery of the same message does nothing.
    assert run_job(job_id, settings, store, storage) == RunOutcome.GONE
    assert store.get(job_id).attempts == 1  # type: ignore[union-attr]


def test_live_claim_is_busy_and_a_stale_one_is_taken_over(settings, store, storage, case):
    job_id = _submit(store, storage, case, preview=False)
    assert store.claim(job_id, "other-host:1", settings.stale_after_s) is not None
    assert run_job(job_id, settings, store, storage) == RunOutcome.BUSY
    assert store.get(job_id).attempts == 1  # type: ignore[union-attr]

    _age_heartbeat(store, job_id, settings.stale_after_s + 1)
    assert run_job(job_id, settings, store, storage) == RunOutcome.SUCCEEDED
    job = store.get(job_id)
    assert job is not None and (job.attempts, job.worker) == (2, worker_name())
    # The first worker, should it wake up, learns it lost the job and cannot finish it.
    seen = store.heartbeat(job_id, "other-host:1", 0.5, "inference")
    assert seen is not None and (seen.state, seen.worker) == (JobState.SUCCEEDED, worker_name())
    assert not store.finish(job_id, "other-host:1", JobState.FAILED, timedelta(hours=1))
    assert store.get(job_id).state == JobState.SUCCEEDED  # type: ignore[union-attr]


def _die_running(store: JobStore, job_id: str, times: int, settings: Settings) -> None:
    """``times`` workers claim the job and die while running it (their heartbeats go
    stale), as when a case makes the out-of-memory killer end every worker it runs on."""
    for n in range(times):
        claimed = store.claim(job_id, f"dead-{n}:1", settings.stale_after_s, settings.max_attempts)
        assert claimed is not None and claimed.attempts == n + 1
        _age_heartbeat(store, job_id, settings.stale_after_s + 1)


def test_a_job_whose_workers_keep_dying_fails_with_worker_lost(settings, store, storage, case):
    assert settings.max_attempts == 3  # the default
    url = "https://hooks.example.org/omnet"
    job_id = _submit(store, storage, case, preview=False, callback_url=url)
    _die_running(store, job_id, settings.max_attempts, settings)
    # A fourth start is refused by the claim itself, whoever asks.
    assert store.claim(job_id, "other-host:1", settings.stale_after_s, 3) is None

    assert run_job(job_id, settings, store, storage) == RunOutcome.FAILED
    job = store.get(job_id)
    assert job is not None
    assert (job.state, job.attempts, job.error_code) == (JobState.FAILED, 3, "worker_lost")
    assert "stopped 3 times (attempts 1-3)" in (job.error_message or ""), job.error_message
    assert "memory" in (job.error_message or "")
    assert job.finished_at is not None and job.expires_at is not None
    [event] = store.deliveries(job_id)
    body = json.loads(event.body)
    assert event.event == "job.failed"
    assert body["data"]["error"] == {"code": "worker_lost", "message": job.error_message}
    # Messages still on their way find a finished job.
    assert run_job(job_id, settings, store, storage) == RunOutcome.GONE
    assert len(store.deliveries(job_id)) == 1


def test_the_last_attempt_runs_and_a_live_one_is_left_alone(settings, store, storage, case):
    limited = settings.model_copy(update={"max_attempts": 2})
    job_id = _submit(store, storage, case, preview=False)
    _die_running(store, job_id, 1, limited)
    assert run_job(job_id, limited, store, storage) == RunOutcome.SUCCEEDED
    assert store.get(job_id).attempts == 2  # type: ignore[union-attr]

    # Exhausted but still beating: its worker is alive, nothing fails it.
    busy = _submit(store, storage, case, preview=False)
    _die_running(store, busy, 1, limited)
    assert store.claim(busy, "live:1", limited.stale_after_s, 2) is not None
    assert run_job(busy, limited, store, storage) == RunOutcome.BUSY
    job = store.get(busy)
    assert job is not None and (job.state, job.worker) == (JobState.RUNNING, "live:1")
    assert not store.fail_exhausted(
        busy, limited.stale_after_s, 2, timedelta(hours=1), "worker_lost", "x"
    )


def test_cancelled_job_is_never_run(settings, store, storage, case):
    job_id = _submit(store, storage, case)
    cancelled = store.cancel(job_id, "alice", timedelta(hours=1))
    assert cancelled is not None and cancelled.state == JobState.CANCELLED
    assert run_job(job_id, settings, store, storage) == RunOutcome.GONE
    job = store.get(job_id)
    assert job is not None
    assert (job.state, job.attempts, job.started_at) == (JobState.CANCELLED, 0, None)
    assert not storage.outputs_dir(job_id).exists()


def test_inputs_broken_after_submission_fail_with_a_code(settings, store, storage, case):
    job_id = _submit(store, storage, case)
    flair = storage.inputs_dir(job_id) / "flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:500])
    assert run_job(job_id, settings, store, storage) == RunOutcome.FAILED
    job = store.get(job_id)
    assert job is not None and job.state == JobState.FAILED
    assert job.error_code == "unreadable" and "flair" in (job.error_message or "")


def test_final_states_record_their_webhook_event(settings, store, storage, case):
    url = "https://hooks.example.org/omnet"
    ok = _submit(store, storage, case, preview=False, callback_url=url)
    broken = _submit(store, storage, case, callback_url=url)
    flair = storage.inputs_dir(broken) / "flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:500])
    assert run_job(ok, settings, store, storage) == RunOutcome.SUCCEEDED
    assert run_job(broken, settings, store, storage) == RunOutcome.FAILED
    # A message delivered again makes no second event.
    assert run_job(ok, settings, store, storage) == RunOutcome.GONE

    [succeeded] = store.deliveries(ok)
    body = json.loads(succeeded.body)
    assert (succeeded.event, succeeded.url, succeeded.status) == ("job.succeeded", url, "pending")
    job = store.get(ok)
    assert job is not None and job.result is not None
    assert body["data"]["volumes_ml"] == job.result["metrics"]["volumes_ml"]
    assert (body["data"]["state"], body["data"]["error"]) == ("succeeded", None)

    [failed] = store.deliveries(broken)
    body = json.loads(failed.body)
    assert (failed.event, body["type"], body["data"]["state"]) == (
        "job.failed",
        "job.failed",
        "failed",
    )
    assert body["data"]["error"]["code"] == "unreadable" and body["data"]["volumes_ml"] is None


def _run_in_thread(settings, store, storage, job_id) -> tuple[threading.Thread, list[RunOutcome]]:
    outcome: list[RunOutcome] = []
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


class _HeldAtFirstBatch:
    """Holds a running job after its first batch of tiles until the test has acted on the
    job's record and the job's heartbeat has seen it; the tile loop's next check then
    stops the job. (A job of a fraction of a second would otherwise end before the test
    acts on a fast machine, and outlive a fixed wait on a loaded one.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.acted = threading.Event(), threading.Event()
        real = runner.process_case

        def held(*args: Any, progress: Any, check: Any, **kwargs: Any) -> Any:
            heartbeat = check.__self__  # the job's Heartbeat (``check`` is its bound method)

            def hold(done: int, total: int) -> None:
                progress(done, total)
                if self.reached.is_set():
                    return
                self.reached.set()
                assert self.acted.wait(60), "the test never acted on the running job"
                deadline = time.monotonic() + 60
                while heartbeat.stop_reason is None and time.monotonic() < deadline:
                    time.sleep(0.01)

            return real(*args, progress=hold, check=check, **kwargs)

        monkeypatch.setattr(runner, "process_case", held)

    def wait_running(self) -> None:
        assert self.reached.wait(60), "the job never reached its first batch of tiles"


def test_cancel_while_running_stops_and_deletes(settings, store, storage, case, monkeypatch):
    held = _HeldAtFirstBatch(monkeypatch)
    slow = settings.model_copy(update={"tiling": "paper"})
    job_id = _submit(store, storage, case)
    thread, outcome = _run_in_thread(slow, store, storage, job_id)
    held.wait_running()
    _wait_inference(store, job_id)
    store.cancel(job_id, "alice", timedelta(hours=1))
    held.acted.set()
    thread.join(60)
    assert outcome == [RunOutcome.CANCELLED]
    job = store.get(job_id)
    assert job is not None and job.state == JobState.CANCELLED and job.result is None
    assert not storage.job_dir(job_id).exists()


def _claim_as(store: JobStore, job_id: str, worker: str) -> None:
    """What ``store.claim`` by ``worker`` does once the running worker's heartbeat is stale
    (done directly: the running worker's heartbeat would keep it fresh)."""
    with store.engine.begin() as conn:
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(worker=worker, heartbeat_at=utcnow(), attempts=jobs.c.attempts + 1)
        )


def test_job_taken_over_while_running_is_left_to_the_new_worker(
    settings, store, storage, case, monkeypatch
):
    held = _HeldAtFirstBatch(monkeypatch)
    slow = settings.model_copy(update={"tiling": "paper"})
    job_id = _submit(store, storage, case)
    thread, outcome = _run_in_thread(slow, store, storage, job_id)
    held.wait_running()
    _wait_inference(store, job_id)
    _claim_as(store, job_id, "other-host:1")
    held.acted.set()
    thread.join(60)
    assert outcome == [RunOutcome.TAKEN_OVER]
    job = store.get(job_id)
    assert job is not None
    assert (job.state, job.worker, job.attempts) == (JobState.RUNNING, "other-host:1", 2)
    assert job.finished_at is None and job.result is None
    assert sorted(p.name for p in storage.inputs_dir(job_id).iterdir()) == sorted(
        f"{name}.nii.gz" for name in (*MODALITIES, "reference")
    ), "the new worker's inputs were touched"


def test_time_limit_fails_the_job(settings, store, storage, case):
    # A limit already spent when the case is loaded: the first check stops the job.
    slow = settings.model_copy(update={"tiling": "paper", "job_time_limit_s": 0.001})
    job_id = _submit(store, storage, case)
    assert run_job(job_id, slow, store, storage) == RunOutcome.FAILED
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


# ------------------------------------------------------------------ run_job's bookkeeping
# A stand-in for the segmentation step: these tests are about what run_job does with
# the job record and the files around it, whatever the segmentation does.
def _partial_output(storage: Storage, job_id: str) -> Path:
    out = storage.outputs_dir(job_id)
    out.mkdir(parents=True, exist_ok=True)
    written = out / "segmentation.nii.gz"
    written.write_bytes(b"\x1f\x8b half a file")
    return written


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("out of memory"), "internal_error"),
        (InputError("unreadable", "flair.nii.gz cannot be read"), "unreadable"),
    ],
    ids=["internal_error", "input_error"],
)
def test_failed_job_keeps_no_partial_outputs(
    settings, store, storage, case, monkeypatch, error, code
):
    job_id = _submit(store, storage, case)

    def fails_after_writing(job, *_args, **_kwargs):
        _partial_output(storage, job.id)
        raise error

    monkeypatch.setattr(runner, "_segment", fails_after_writing)
    assert run_job(job_id, settings, store, storage) == RunOutcome.FAILED
    job = store.get(job_id)
    assert job is not None and (job.state, job.error_code) == (JobState.FAILED, code)
    assert not storage.outputs_dir(job_id).exists(), "partial outputs were left"
    assert storage.inputs_dir(job_id).is_dir()


def _lose_job(store: JobStore, job_id: str, how: str) -> None:
    if how == "cancelled":
        assert store.cancel(job_id, "alice", timedelta(hours=1)) is not None
    else:
        _claim_as(store, job_id, "other-host:1")


@pytest.mark.parametrize(
    ("how", "outcome"),
    [("cancelled", RunOutcome.CANCELLED), ("taken_over", RunOutcome.TAKEN_OVER)],
)
def test_job_lost_between_last_beat_and_finish(
    settings, store, storage, case, monkeypatch, how, outcome
):
    job_id = _submit(store, storage, case)

    def loses_the_job_then_succeeds(job, *_args, **_kwargs):
        written = _partial_output(storage, job.id)
        _lose_job(store, job.id, how)
        files = {"segmentation": storage.key(written)}
        return {"files": files, "metrics": {}, "model": {"name": "m", "sha256": "0" * 64}}

    monkeypatch.setattr(runner, "_segment", loses_the_job_then_succeeds)
    assert run_job(job_id, settings, store, storage) == outcome
    job = store.get(job_id)
    assert job is not None and job.result is None
    if how == "cancelled":
        assert job.state == JobState.CANCELLED
        assert not storage.job_dir(job_id).exists()
    else:  # the record and the files are the other worker's
        assert (job.state, job.worker) == (JobState.RUNNING, "other-host:1")
        assert storage.inputs_dir(job_id).is_dir()
        assert (storage.outputs_dir(job_id) / "segmentation.nii.gz").is_file()


# ------------------------------------------------------------ retrieval by study_uid
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _submit_study_uid(store: JobStore) -> str:
    opts = JobOptions(study_uid="1.2.826.0.1.3680043.8.498.77").model_dump()
    job, _ = store.create("alice", opts, {}, "test.cpu")
    return job.id


def _from_source(settings: Settings, url: str, patience_s: float) -> Settings:
    return settings.model_copy(
        update={"dicomweb_source": SecretStr(url), "dicomweb_retrieve_patience_s": patience_s}
    )


def test_an_unreachable_source_is_retried_until_the_patience_runs_out(settings, store, storage):
    source = _from_source(settings, f"http://127.0.0.1:{_closed_port()}/dicom-web", 3.0)
    job_id = _submit_study_uid(store)
    started = time.monotonic()
    assert run_job(job_id, source, store, storage) == RunOutcome.FAILED
    took = time.monotonic() - started
    job = store.get(job_id)
    assert job is not None and job.error_code == "dicomweb_unavailable"
    # Tried at once, after 2 s, and at the deadline (3 s).
    assert "3 attempts over 3 s" in (job.error_message or ""), job.error_message
    assert 3.0 <= took < 20, took


@pytest.mark.parametrize(
    ("status", "code", "retried"),
    [
        (503, "dicomweb_unavailable", True),
        (400, "dicomweb_unavailable", False),
        (401, "dicomweb_refused", False),
    ],
)
def test_only_transient_source_failures_are_retried(
    settings, store, storage, status, code, retried
):
    with status_server(status) as (url, server):
        job_id = _submit_study_uid(store)
        assert run_job(job_id, _from_source(settings, url, 8.0), store, storage) == (
            RunOutcome.FAILED
        )
        job = store.get(job_id)
        assert job is not None and job.error_code == code
        assert ("attempts over" in (job.error_message or "")) == retried, job.error_message
        assert (server.requests > 1) == retried, server.requests  # one request an attempt


def test_a_job_waiting_for_its_source_shows_it_and_can_be_cancelled(settings, store, storage):
    source = _from_source(settings, f"http://127.0.0.1:{_closed_port()}/dicom-web", 600.0)
    job_id = _submit_study_uid(store)
    thread, outcome = _run_in_thread(source, store, storage, job_id)
    deadline = time.monotonic() + 20
    while (job := store.get(job_id)) is None or job.stage != "waiting for the DICOMweb source":
        assert time.monotonic() < deadline, f"never shown as waiting: {job}"
        time.sleep(0.05)
    assert job.state == JobState.RUNNING
    store.cancel(job_id, "alice", timedelta(hours=1))
    thread.join(10)
    assert outcome == [RunOutcome.CANCELLED]


# ------------------------------------------------------------ the job database blinks
class _Blink:
    """Takes the SQLite job database away (a folder in its place: every new connection
    fails with "unable to open database file") and puts it back ``after_s`` later."""

    def __init__(self, store: JobStore, after_s: float) -> None:
        self.store, self.after_s = store, after_s
        self.path = Path(store.engine.url.database or "")

    def _files(self) -> list[Path]:
        return [Path(f"{self.path}{suffix}") for suffix in ("", "-wal", "-shm")]

    def start(self) -> None:
        self.store.engine.dispose()  # pooled connections would keep the old file open
        # The folder takes the database's place in one step (see _back), then the journal
        # files go too.
        main, *journals = self._files()
        away = main.with_name(main.name + ".away")
        away.mkdir()
        _exchange(away, main)
        for path in journals:
            if path.exists():
                path.rename(path.with_name(path.name + ".away"))
        threading.Timer(self.after_s, self._back).start()

    def _back(self) -> None:
        # The journal files first (nothing opens them without the database), then the
        # database swapped with the folder in one step: a connection made between "folder
        # gone" and "file back" would create a new, empty database and see no tables.
        main, *journals = self._files()
        for path in journals:
            away = path.with_name(path.name + ".away")
            if away.exists():
                away.rename(path)
        away = main.with_name(main.name + ".away")
        _exchange(away, main)
        away.rmdir()


def _exchange(a: Path, b: Path) -> None:
    """Swaps two paths atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_database_blink_at_the_claim_delays_the_job(settings, store, storage, case, caplog):
    # The worker's patience with the database (stale_after_s) well beyond the blink, so
    # that a loaded machine, slow to put the database back, cannot outlast it.
    settings.stale_after_s = 30.0
    job_id = _submit(store, storage, case, preview=False)
    _Blink(store, after_s=1.5).start()
    started = time.monotonic()
    assert run_job(job_id, settings, store, storage) == RunOutcome.SUCCEEDED
    assert time.monotonic() - started >= 1.5
    job = store.get(job_id)
    assert job is not None and (job.state, job.attempts) == (JobState.SUCCEEDED, 1)
    assert "did not take the claim" in caplog.text


class _BlinksAtFinish(JobStore):
    """A job store whose database goes away just as the result is recorded."""

    blinked = False

    def finish(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.blinked:
            self.blinked = True
            _Blink(self, after_s=1.5).start()
        return super().finish(*args, **kwargs)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_database_blink_at_the_finish_keeps_the_result(
    settings, database_url, storage, case, caplog
):
    settings.stale_after_s = 30.0  # patience well beyond the blink, as above
    store = _BlinksAtFinish(database_url)
    job_id = _submit(store, storage, case, preview=False)
    assert run_job(job_id, settings, store, storage) == RunOutcome.SUCCEEDED
    job = store.get(job_id)
    assert job is not None and (job.state, job.attempts) == (JobState.SUCCEEDED, 1)
    assert job.result is not None and storage.path(job.result["files"]["segmentation"]).is_file()
    assert "did not record the result" in caplog.text
    store.engine.dispose()


def test_a_claim_whose_answer_was_lost_is_still_this_workers(settings, store, storage, case):
    """The claim's commit went through but its answer never came (a connection cut at
    the commit): the message, delivered again, finds the job running under this very
    process and runs it, instead of leaving it to be taken over as stale."""
    job_id = _submit(store, storage, case, preview=False)
    assert store.claim(job_id, worker_name(), settings.stale_after_s) is not None
    assert run_job(job_id, settings, store, storage) == RunOutcome.SUCCEEDED
    assert store.get(job_id).state == JobState.SUCCEEDED  # type: ignore[union-attr]


@pytest.mark.parametrize("max_attempts", [3, 1])
def test_a_claim_by_an_earlier_process_of_the_same_name_counts_an_attempt(
    settings, store, storage, case, monkeypatch, max_attempts
):
    """A restarted container keeps its host name and pid: the job its earlier process
    claimed looks like this process's own. This start counts as an attempt, so a case
    that kills its worker at every start still ends with worker_lost."""
    job_id = _submit(store, storage, case, preview=False)
    assert store.claim(job_id, worker_name(), settings.stale_after_s) is not None
    later = store.get(job_id).started_at + timedelta(seconds=1)  # type: ignore[union-attr]
    monkeypatch.setattr(runner, "_process_started_at", later)  # this process started after
    settings.max_attempts = max_attempts
    outcome = run_job(job_id, settings, store, storage)
    job = store.get(job_id)
    assert job is not None
    if max_attempts == 1:
        assert outcome == RunOutcome.FAILED
        assert (job.state, job.error_code, job.attempts) == (JobState.FAILED, "worker_lost", 1)
    else:
        assert outcome == RunOutcome.SUCCEEDED
        assert (job.state, job.attempts) == (JobState.SUCCEEDED, 2)


def _submit_dicom(store: JobStore, storage: Storage, folder: Path) -> str:
    """A job whose input is a DICOM study folder (as an upload of .dcm parts is stored)."""
    job_id = str(uuid.uuid4())
    target = storage.inputs_dir(job_id) / "dicom"
    shutil.copytree(folder, target)
    opts = JobOptions(destinations="").model_dump()  # type: ignore[call-arg]
    store.create("alice", opts, {"dicom": storage.key(target)}, "test.cpu", job_id=job_id)
    return job_id


def test_a_dicom_output_that_fails_keeps_the_result(
    settings, store, storage, tmp_path, monkeypatch
):
    """The SEG cannot be written after inference: the job still succeeds, its label map
    and metrics are kept and downloadable, a warning says what failed, and the result
    records it for the download routes; the preview, which could be written, is kept."""
    import model.io.dicom.seg as outputs_module
    from model.io.dicom.write_series import write_study
    from model.io.phantom import make_phantom

    images, _, affine = make_phantom((32, 32, 16), seed=8)
    write_study(images, affine, tmp_path / "study")
    job_id = _submit_dicom(store, storage, tmp_path / "study")
    real = outputs_module.atomic_write

    def seg_fails(path, write):
        if path.name == OUTPUT_FILES["dicom_seg"]:
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(outputs_module, "atomic_write", seg_fails)
    assert run_job(job_id, settings, store, storage) == RunOutcome.SUCCEEDED
    job = store.get(job_id)
    assert job is not None and job.state == JobState.SUCCEEDED and job.result is not None
    files = job.result["files"]
    assert "dicom_seg" not in files and {"segmentation", "metrics", "dicom_preview"} <= set(files)
    for key in files.values():
        assert storage.path(key).is_file(), key
    failure = "the DICOM SEG could not be written ([Errno 28] No space left on device)"
    assert job.result["failed"] == {"dicom_seg": failure}
    warning = f"{failure}; the label map and metrics are kept"
    assert warning in job.result["metrics"]["warnings"]
    stored = json.loads(storage.path(files["metrics"]).read_text())
    assert warning in stored["warnings"]


def test_moving_progress_is_written_between_heartbeats(monkeypatch):
    """With a 10 s heartbeat, a job whose tiles advance still shows them every couple of
    seconds; a job whose progress stands still is written at the heartbeat only."""
    from worker import heartbeat

    monkeypatch.setattr(heartbeat, "PROGRESS_S", 0.05)
    writes: list[float] = []

    class Recorder:
        def heartbeat(self, job_id, worker, fraction, stage):
            writes.append(fraction)
            return None  # the job is gone: the beat notes it, the thread keeps going

    hb = heartbeat.Heartbeat(Recorder(), "job", "me", interval=10.0, deadline=1e12)
    hb.start()
    try:
        for step in range(1, 6):
            hb.progress.fraction = 0.1 * step
            time.sleep(0.3)
        moving = len(writes)
        time.sleep(0.5)  # no movement: nothing more until the 10 s beat
        assert len(writes) == moving
    finally:
        hb.close()
    assert moving >= 4, writes
    assert writes == sorted(writes) and writes[-1] == pytest.approx(0.5)


def test_time_left_follows_the_progress_rate():
    from datetime import timedelta

    from service.db import Job, JobState, utcnow
    from service.routes.jobs import _eta_s

    now = utcnow()

    def job(state: JobState, progress: float, started: float | None) -> Job:
        begun = None if started is None else now - timedelta(seconds=started)
        return Job(
            id="x", owner="o", state=state, created_at=now, progress=progress, started_at=begun
        )

    assert _eta_s(job(JobState.RUNNING, 0.25, 30)) == pytest.approx(90.0, abs=2.0)
    assert _eta_s(job(JobState.RUNNING, 0.02, 1)) is None  # no rate yet
    assert _eta_s(job(JobState.QUEUED, 0.0, None)) is None
