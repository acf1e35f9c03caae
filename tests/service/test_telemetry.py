"""service/telemetry.py: each app's /metrics reports the jobs of its own store.

Two apps in one process (as in these tests, or an embedded server beside another), each
with its own storage folder and SQLite job records; no broker is contacted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.db import JobStore


def _app(root: Path) -> FastAPI:
    return create_app(Settings(storage_dir=root, open_mode=True))


def _jobs(client: TestClient) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    text = response.text
    found = re.findall(r'^omnet_jobs\{state="(\w+)"\} ([0-9.]+)$', text, re.MULTILINE)
    depth = re.findall(r"^omnet_queue_depth ([0-9.]+)$", text, re.MULTILINE)
    assert len(depth) == 1, text
    return {**{state: float(n) for state, n in found}, "depth": float(depth[0])}


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    with (
        TestClient(_app(tmp_path / "a")) as first,
        TestClient(_app(tmp_path / "b")) as second,
    ):
        yield first, second


def _store(client: TestClient) -> JobStore:
    store: JobStore = client.app.state.store  # type: ignore[attr-defined]
    return store


def test_each_app_reports_its_own_jobs(apps):
    first, second = apps
    for _ in range(2):
        _store(first).create("alice", {}, {}, "omnet.cpu")
    cancelled, _ = _store(second).create("bob", {}, {}, "omnet.cpu")
    _store(second).cancel(cancelled.id, "bob", timedelta(hours=1))

    zero = dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0.0)
    assert _jobs(first) == {**zero, "queued": 2.0, "depth": 2.0}
    assert _jobs(second) == {**zero, "cancelled": 1.0, "depth": 0.0}
    # Scraped again, in the other order: nothing was bound to the first app scraped.
    assert _jobs(second)["cancelled"] == 1.0
    assert _jobs(first)["queued"] == 2.0
