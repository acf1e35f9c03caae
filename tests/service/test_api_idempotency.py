"""Idempotency-Key on each job database (SQLite and PostgreSQL): a retried submission
gets the job its first attempt made, the same key with another submission is refused
with 422 ``idempotency_key_reused``, and submissions racing with one key make one job.

The app runs in process (embedded mode: jobs are queued as files, no worker runs) on a
real job database, and then as a real uvicorn process for the race.
"""

from __future__ import annotations

import gzip
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.datastructures import UploadFile

from service.db import JobStore
from service.dicom_uploads import store_dicom
from service.errors import ApiError
from service.routes import jobs as jobs_routes
from tests.service.support import Phantom, base_env, open_app, store_of
from tests.service.support import stack as make_stack

KEY = {"Idempotency-Key": "case-0001"}
#: Two different submissions of one case: the defaults, and probability maps as well.
OPTIONS_A: dict[str, str] = {}
OPTIONS_B = {"probabilities": "true"}


@pytest.fixture
def client(tmp_path: Path, database_url: str) -> Iterator[TestClient]:
    with open_app(tmp_path / "storage", database_url) as client:
        yield client


def _store(client: TestClient) -> JobStore:
    return store_of(client)


def _post(client: Any, phantom: Phantom, options: dict[str, str], **files: Any) -> Any:
    return client.post("/v1/jobs", files=phantom.files(**files), data=options, headers=KEY)


def _refused(response: Any) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "idempotency_key_reused", error
    assert "new Idempotency-Key" in error["message"], error
    return str(error["message"])


def _files_left(storage: Path) -> tuple[list[str], list[str]]:
    """The job folders and staging folders in ``storage``."""
    jobs, staging = storage / "jobs", storage / "staging"
    return (
        sorted(p.name for p in jobs.iterdir()) if jobs.is_dir() else [],
        sorted(p.name for p in staging.iterdir()) if staging.is_dir() else [],
    )


def test_a_retry_with_the_same_submission_gets_the_first_job(client, phantom):
    first = _post(client, phantom, {"preview": "true"})
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    # The same files and options, the options written otherwise (or left at default).
    for options in ({"preview": "1"}, {}, {"preview": "yes", "probabilities": "false"}):
        again = _post(client, phantom, options)
        assert again.status_code == 202, again.text
        assert again.json()["id"] == job_id
        assert again.headers["location"] == first.headers["location"]
    assert client.get("/v1/jobs").json()["total"] == 1
    job = _store(client).get(job_id)
    assert job is not None and job.submission_sha256 is not None
    assert len(job.submission_sha256) == 64
    assert _files_left(client.app.state.settings.storage_dir) == ([job_id], [])


def test_the_same_key_with_other_options_or_files_is_refused(client, phantom):
    first = _post(client, phantom, OPTIONS_A)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    message = _refused(_post(client, phantom, OPTIONS_B))
    assert job_id in message
    # The same voxels in another file (compressed again): other files.
    t1 = gzip.compress(gzip.decompress(phantom.data["t1"]), compresslevel=9)
    _refused(_post(client, phantom, OPTIONS_A, t1=("case_t1.nii.gz", t1)))
    _refused(_post(client, phantom, OPTIONS_A, reference=("seg.nii.gz", phantom.data["reference"])))
    assert client.get("/v1/jobs").json()["total"] == 1
    assert _files_left(client.app.state.settings.storage_dir) == ([job_id], [])
    assert _post(client, phantom, OPTIONS_A).json()["id"] == job_id  # still its job


def test_a_job_recorded_without_a_fingerprint_answers_any_submission_with_its_key(client, phantom):
    """Jobs created before fingerprints were recorded keep the earlier behaviour."""
    old, created = _store(client).create("anonymous", {}, {}, "omnet.cpu", KEY["Idempotency-Key"])
    assert created and old.submission_sha256 is None
    for options in (OPTIONS_A, OPTIONS_B):
        answer = _post(client, phantom, options)
        assert answer.status_code == 202, answer.text
        assert answer.json()["id"] == old.id
    assert client.get("/v1/jobs").json()["total"] == 1


def _race(post: Any, phantom: Phantom, bodies: list[dict[str, str]]) -> list[Any]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda options: post(phantom, options), bodies))


def _one_job_for_matching_bodies(
    answers: list[Any], bodies: list[dict[str, str]], jobs: list[dict[str, Any]]
) -> None:
    """Exactly one job; the submissions with its body got it, the others 422."""
    assert len(jobs) == 1, jobs
    job = jobs[0]
    won = OPTIONS_B if job["options"]["probabilities"] else OPTIONS_A
    for options, answer in zip(bodies, answers, strict=True):
        if options == won:
            assert answer.status_code == 202, answer.text
            assert answer.json()["id"] == job["id"]
        else:
            _refused(answer)


def test_submissions_racing_with_one_key_make_one_job(client, phantom, monkeypatch):
    """Every submission passes the look-up of the key and stages its files before any is
    recorded (they wait for each other), so all of them race to record their job."""
    bodies = [OPTIONS_A, OPTIONS_B] * 3
    barrier = threading.Barrier(len(bodies), timeout=120)
    real = jobs_routes.receive_case

    async def staged_together(*args: Any, **kwargs: Any) -> Any:
        upload = await real(*args, **kwargs)
        await anyio.to_thread.run_sync(barrier.wait)
        return upload

    monkeypatch.setattr(jobs_routes, "receive_case", staged_together)
    answers = _race(lambda p, o: _post(client, p, o), phantom, bodies)
    jobs = client.get("/v1/jobs").json()["items"]
    _one_job_for_matching_bodies(answers, bodies, jobs)
    assert _files_left(client.app.state.settings.storage_dir) == ([jobs[0]["id"]], [])


def test_submissions_racing_with_one_key_on_an_api_process_make_one_job(
    tmp_path, database_url, tiny_checkpoint, phantom
):
    env = base_env(tiny_checkpoint, OMNET_DATABASE_URL=database_url)
    with make_stack("idempotency", tmp_path, env) as s:
        api = s.wait_api(s.start_api())
        bodies = [OPTIONS_A, OPTIONS_B] * 4
        clients = [api.client("alice", timeout=120) for _ in bodies]
        lock = threading.Lock()

        def post(phantom: Phantom, options: dict[str, str]) -> httpx.Response:
            with lock:
                client = clients.pop()
            return _post(client, phantom, options)

        answers = _race(post, phantom, bodies)
        jobs = api.client("alice").get("/v1/jobs").json()["items"]
        _one_job_for_matching_bodies(answers, bodies, jobs)
        assert _files_left(s.storage) == ([jobs[0]["id"]], [])
        # Keys are per caller: another caller's submission with the key is their own job.
        bob = api.client("bob")
        theirs = _post(
            bob, phantom, OPTIONS_B if jobs[0]["options"]["probabilities"] else OPTIONS_A
        )
        assert theirs.status_code == 202, theirs.text
        assert theirs.json()["id"] != jobs[0]["id"]
        assert bob.get("/v1/jobs").json()["total"] == 1


def test_dicom_parts_are_fingerprinted_as_copied_in_any_order(tmp_path):
    """The parts of a study sent as 'dicom' files: their SHA-256s, taken as they are
    copied into staging, whatever their order (the check of the study then fails: they
    are not DICOM)."""
    parts = [b"part-one", b"part-two", b"part-three"]

    def fingerprint(order: list[bytes], name: str) -> str:
        uploads = [
            UploadFile(io.BytesIO(data), filename=f"{n}.dcm") for n, data in enumerate(order)
        ]
        digests: dict[str, str] = {}
        (tmp_path / name).mkdir()
        with pytest.raises(ApiError):
            store_dicom(None, uploads, tmp_path / name, 2**20, {}, digests=digests)
        return digests["dicom"]

    first = fingerprint(parts, "a")
    assert fingerprint(parts[::-1], "b") == first
    assert fingerprint([*parts[:2], b"part-3"], "c") != first
