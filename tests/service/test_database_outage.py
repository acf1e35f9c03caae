"""The job database stops answering under a running API: every request gets 503
``database_unavailable`` with Retry-After (never a 500), and a submission leaves no
files behind.

The app runs in process (no broker is reached: the requests fail before queueing); the
outage is real: the SQLite file is taken away and a folder put in its place, so each new
connection fails with SQLite's own "unable to open database file".
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model.phantom import write_phantom
from service.app import create_app
from service.config import Settings
from service.db import JobStore

MODALITIES = ("t1", "t1ce", "t2", "flair")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(storage_dir=tmp_path / "storage", open_mode=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _take_database_away(client: TestClient) -> None:
    store: JobStore = client.app.state.store  # type: ignore[attr-defined]
    database = Path(store.engine.url.database or "")
    store.engine.dispose()  # the pooled connections would keep the old file open
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    database.mkdir()


def _assert_database_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"]["code"] == "database_unavailable", body
    assert "try again" in body["error"]["message"]
    assert response.headers["Retry-After"] == "5"


def test_reads_and_changes_answer_503_while_the_database_is_away(client, tmp_path):
    assert client.get("/v1/jobs").status_code == 200
    _take_database_away(client)
    _assert_database_unavailable(client.get("/v1/jobs"))
    _assert_database_unavailable(client.get("/v1/jobs/00000000-0000-0000-0000-000000000000"))
    _assert_database_unavailable(client.delete("/v1/jobs/00000000-0000-0000-0000-000000000000"))
    assert client.get("/readyz").status_code == 503


def test_a_submission_the_database_cannot_record_leaves_no_files(client, tmp_path):
    case = write_phantom(tmp_path / "case", name="case", shape=(24, 24, 16), seed=1)
    files = [(m, (case[m].name, case[m].read_bytes(), "application/gzip")) for m in MODALITIES]
    _take_database_away(client)
    _assert_database_unavailable(client.post("/v1/jobs", files=files))
    jobs = tmp_path / "storage" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir()), list(jobs.iterdir())
    shutil.rmtree(tmp_path / "case")
