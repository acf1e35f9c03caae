"""The job routes on each job database (SQLite and PostgreSQL): query parameters and ids
that no database can take are 4xx, never 500, and a page of jobs costs the same number
of SQL statements however many jobs it holds.

The app runs in process on a real job database (the ``database_url`` fixture); no broker
is reached (nothing is submitted through the API: jobs are recorded in the store).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.db import JobState, JobStore, NewDelivery
from tests.service.support import open_app, store_of

#: Largest value of the 64-bit signed integers that SQLite and PostgreSQL hold.
MAX_BIGINT = 2**63 - 1


@pytest.fixture
def client(tmp_path: Path, database_url: str) -> Iterator[TestClient]:
    with open_app(tmp_path / "storage", database_url) as client:
        yield client


def _store(client: TestClient) -> JobStore:
    return store_of(client)


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, (response.request.url, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


@pytest.mark.parametrize(
    "query",
    [
        f"offset={MAX_BIGINT + 1}",
        f"offset={10**30}",
        f"limit={MAX_BIGINT + 1}",
        "offset=-1",
        "offset=1e3",
        "offset=%00",
    ],
)
def test_page_parameters_beyond_the_database_are_invalid_requests(client, query):
    message = _error(client.get(f"/v1/jobs?{query}"), 422, "invalid_request")
    assert query.split("=")[0] in message


def test_the_largest_offset_the_database_holds_is_an_empty_page(client):
    _store(client).create("anonymous", {}, {}, "omnet.cpu")
    page = client.get(f"/v1/jobs?offset={MAX_BIGINT}")
    assert page.status_code == 200, page.text
    assert (page.json()["items"], page.json()["total"]) == ([], 1)


#: Every route that takes a job id (method, path with {id}).
ID_ROUTES = [
    ("GET", "/v1/jobs/{id}"),
    ("DELETE", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/segmentation"),
    ("GET", "/v1/jobs/{id}/segmentation?format=dicom-seg"),
    ("GET", "/v1/jobs/{id}/probabilities"),
    ("GET", "/v1/jobs/{id}/metrics"),
    ("GET", "/v1/jobs/{id}/preview.png"),
    ("GET", "/v1/jobs/{id}/preview.dcm"),
    ("POST", "/v1/jobs/{id}/deliveries/retry"),
    ("GET", "/v1/jobs/{id}/inputs/t1"),
]
#: Ids no job can have, as they appear in a URL path.
IMPOSSIBLE_IDS = [
    "%00",
    "00000000-0000-0000-0000-00000000000%00",
    "%C3%A9",
    "x" * 2000,
    "00000000-0000-0000-0000-000000000000%20",
    "00000000000000000000000000000000",
]


@pytest.mark.parametrize(("method", "path"), ID_ROUTES)
def test_ids_no_job_can_have_are_job_not_found(client, method, path):
    job, _ = _store(client).create("anonymous", {}, {}, "omnet.cpu")
    for raw in [*IMPOSSIBLE_IDS, str(uuid.uuid4())]:
        response = client.request(method, path.replace("{id}", raw))
        message = _error(response, 404, "job_not_found")
        assert "\x00" not in message and len(message) < 300, message
    # The job itself is found by the same routes (its record is untouched).
    response = client.request(method, path.replace("{id}", job.id))
    assert response.status_code != 500 and (
        response.status_code != 404 or response.json()["error"]["code"] != "job_not_found"
    ), response.text


# --------------------------------------------------------------------------- statements
class _Statements:
    """Counts the SQL statements an engine runs while it is attached."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine, self.count = engine, 0

    def _count(self, *_args: Any) -> None:
        self.count += 1

    def __enter__(self) -> _Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *_exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._count)


def _jobs(store: JobStore, n: int) -> list[str]:
    """``n`` jobs of ``anonymous``: queued, running, succeeded and failed ones, every
    third with a webhook event."""
    ids = []
    for i in range(n):
        job, _ = store.create("anonymous", {"callback_url": "https://h.example.org"}, {}, "q")
        if i % 3 == 0:
            event = NewDelivery(f"msg_{i}", job.id, "anonymous", "job.failed", "https://h", "{}")
            store.claim(job.id, "w:1", 60)
            store.finish(job.id, "w:1", JobState.FAILED, timedelta(hours=1), event=event)
        elif i % 3 == 1:
            store.claim(job.id, "w:1", 60)
        ids.append(job.id)
    return ids


def test_a_page_of_jobs_takes_a_fixed_number_of_statements(client):
    store = _store(client)
    ids = _jobs(store, 100)
    counts = {}
    for limit in (1, 10, 100):
        with _Statements(store.engine) as statements:
            page = client.get(f"/v1/jobs?limit={limit}")
        assert page.status_code == 200, page.text
        assert len(page.json()["items"]) == limit
        counts[limit] = statements.count
    assert counts[1] == counts[10] == counts[100] <= 5, counts

    # The page says what each job's own status says.
    items = {item["id"]: item for item in client.get("/v1/jobs?limit=100").json()["items"]}
    assert set(items) == set(ids)
    for job_id in (ids[0], ids[1], ids[2], ids[-1]):
        status = client.get(f"/v1/jobs/{job_id}").json()
        assert items[job_id] == status
    queued = [item for item in items.values() if item["state"] == "queued"]
    assert sorted(item["queue_position"] for item in queued) == list(range(1, len(queued) + 1))
    failed = [item for item in items.values() if item["state"] == "failed"]
    assert failed and all(len(item["deliveries"]) == 1 for item in failed)
