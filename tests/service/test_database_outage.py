"""The job database stops answering under a running API: every request gets 503
``database_unavailable`` with Retry-After (never a 500), and a submission leaves no
files behind.

First in process (no broker is reached: the requests fail before queueing), the SQLite
file taken away and a folder put in its place, so each new connection fails with
SQLite's own "unable to open database file". Then a real API process on PostgreSQL
behind a proxy that stops forwarding: the server accepts connections but never answers.
Last, ``omnet serve`` started against such a database: it exits with one line saying
what to check, or, when the database stopped answering after the start-up check, runs
and answers 503.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from model.io.phantom import write_phantom
from service.app import create_app
from service.config import Settings
from service.db import JobStore
from tests.conftest import postgres_database
from tests.service.support import (
    OMNET,
    PausableProxy,
    Phantom,
    Stack,
    base_env,
    free_port,
    wait_until,
)
from tests.service.support import stack as make_stack

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


# ------------------------------------------------- a server that never answers
#: OMNET_DATABASE_TIMEOUT_S of the API below.
TIMEOUT_S = 2.0
#: The longest a request may wait for the database: a free pooled connection, then the
#: check that it answers, then a new connection (each up to the timeout), and a commit
#: left without an answer waits out the server's idle-transaction timeout (+ 1 s).
BOUND_S = 3 * TIMEOUT_S + 1.0
#: What a loaded 2-core machine adds.
SLACK_S = 5.0
#: An API process's start before it reaches the database (imports), on such a machine.
STARTUP_S = 30.0


@pytest.fixture
def proxied(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[tuple[Stack, PausableProxy, str]]:
    """An API process (embedded mode, no worker) whose job database is a PostgreSQL one
    reached through a :class:`PausableProxy`; yields the stack, the proxy and the
    database's direct URL."""
    with postgres_database() as url:
        direct = sa.engine.make_url(url)
        proxy = PausableProxy((direct.host or "127.0.0.1", direct.port or 5432))
        via_proxy = direct.set(host="127.0.0.1", port=proxy.port)
        env = base_env(
            tiny_checkpoint,
            OMNET_DATABASE_URL=via_proxy.render_as_string(hide_password=False),
            OMNET_DATABASE_TIMEOUT_S=str(TIMEOUT_S),
        )
        try:
            with make_stack("hung-database", tmp_path, env) as s:
                s.wait_api(s.start_api())
                yield s, proxy, url
        finally:
            proxy.close()


def _jobs_in(url: str) -> int:
    """Job records in the database, counted directly (not through the proxy)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar_one())
    finally:
        engine.dispose()


def _timed(call) -> tuple[httpx.Response | Exception, float]:
    started = time.monotonic()
    try:
        return call(), time.monotonic() - started
    except httpx.HTTPError as exc:  # no answer within the client's own timeout
        return exc, time.monotonic() - started


def _assert_unavailable(answer: httpx.Response | Exception, took: float, what: str) -> None:
    assert isinstance(answer, httpx.Response), f"{what}: no answer after {took:.1f} s ({answer!r})"
    _assert_database_unavailable(answer)
    assert took <= BOUND_S + SLACK_S, f"{what} took {took:.1f} s"


def test_a_database_that_never_answers_gives_503_within_the_timeout(
    proxied: tuple[Stack, PausableProxy, str], phantom: Phantom
):
    """With the proxy paused, concurrent reads and a submission answer 503 within the
    bound while /healthz answers at once; the submission leaves no job once the proxy
    forwards again, and the API serves again."""
    s, proxy, url = proxied
    api = s.apis[0]
    client = api.client("alice", timeout=BOUND_S + 2 * SLACK_S)
    assert client.get("/v1/jobs").status_code == 200  # pooled connections exist

    proxy.pause()
    answers: list[tuple[httpx.Response | Exception, float]] = []
    reads = [
        threading.Thread(target=lambda: answers.append(_timed(lambda: client.get("/v1/jobs"))))
        for _ in range(4)
    ]
    for thread in reads:
        thread.start()
    slowest = 0.0
    while any(t.is_alive() for t in reads):
        health, took = _timed(lambda: httpx.get(f"{api.url}/healthz", timeout=10))
        assert isinstance(health, httpx.Response) and health.status_code == 200, health
        slowest = max(slowest, took)
        time.sleep(0.2)
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s while the database hung"
    assert len(answers) == len(reads)
    for answer, took in answers:
        _assert_unavailable(answer, took, "GET /v1/jobs")

    answer, took = _timed(lambda: client.post("/v1/jobs", files=phantom.files()))
    _assert_unavailable(answer, took, "POST /v1/jobs")
    # An API started now stops, saying why, instead of waiting in silence.
    second = s.start_api("api-2").proc
    second.popen.wait(timeout=BOUND_S + STARTUP_S)
    assert second.popen.returncode != 0
    assert "connection timeout expired" in second.output(), second.tail()
    proxy.resume()
    # Whatever the API had sent reaches the server now; no job may come of it.
    wait_until(lambda: client.get("/v1/jobs").status_code == 200, 30, "the API to serve", s)
    assert _jobs_in(url) == 0
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_submission_whose_commit_gets_no_answer_is_never_created_later(
    proxied: tuple[Stack, PausableProxy, str], phantom: Phantom
):
    """The proxy stops as the submission's COMMIT goes through it: the API answers 503
    and only then, resumed, the proxy delivers the COMMIT; the server has ended the
    transaction by then, so no job appears."""
    s, proxy, url = proxied
    client = s.apis[0].client("alice", timeout=BOUND_S + 2 * SLACK_S)
    assert client.get("/v1/jobs").status_code == 200

    proxy.pause_on(b"COMMIT")
    answer, took = _timed(lambda: client.post("/v1/jobs", files=phantom.files()))
    _assert_unavailable(answer, took, "POST /v1/jobs")
    proxy.resume()
    time.sleep(TIMEOUT_S + 1.0)  # the held COMMIT has reached the server
    assert _jobs_in(url) == 0
    files = s.storage / "jobs"
    assert not files.exists() or not any(files.iterdir()), list(files.iterdir())


# ------------------------------------------------- omnet serve started against it
#: Where the proxy stops forwarding: at once (the server accepts the connection and
#: never answers), at the first statement on a new connection (SQLAlchemy's checks of
#: the server, before the pool hands the connection out), and at the API's first
#: purge of expired jobs (after the schema check passed).
HOLD_AT = {
    "connect": None,
    "first-statement": b"pg_catalog.version()",
    "first-purge": b"jobs.expires_at <",
}


@pytest.fixture
def paused_database(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A PostgreSQL database behind a :class:`PausableProxy` that stops forwarding as
    ``HOLD_AT[request.param]`` says; yields the URL through the proxy and the param."""
    with postgres_database() as url:
        direct = sa.engine.make_url(url)
        proxy = PausableProxy((direct.host or "127.0.0.1", direct.port or 5432))
        marker = HOLD_AT[request.param]
        if marker is None:
            proxy.pause()
        else:
            proxy.pause_on(marker)
        try:
            via = direct.set(host="127.0.0.1", port=proxy.port)
            yield via.render_as_string(hide_password=False), request.param
        finally:
            proxy.close()


def _serve(tmp_path: Path, database_url: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNET_")}
    env.update(
        OMNET_STORAGE_DIR=str(tmp_path / "storage"),
        OMNET_DATABASE_URL=database_url,
        OMNET_DATABASE_TIMEOUT_S="1",
        OMNET_OPEN_MODE="true",
    )
    cmd = [*OMNET, "serve", "--no-worker", "--port", str(free_port())]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("paused_database", ["connect", "first-statement"], indirect=True)
def test_omnet_serve_on_a_database_that_never_answers_exits_with_one_line(
    tmp_path: Path, paused_database: tuple[str, str]
):
    url, _where = paused_database
    serve = _serve(tmp_path, url)
    try:
        _, stderr = serve.communicate(timeout=STARTUP_S + BOUND_S)
    finally:
        serve.kill()
    assert serve.returncode == 1, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    port = sa.engine.make_url(url).port
    assert last.startswith(
        f"omnet serve: error: the job database (PostgreSQL at 127.0.0.1:{port}, database "
    ), stderr
    assert "did not answer within 1 s (OMNET_DATABASE_TIMEOUT_S)" in last, last
    assert "OMNET_DATABASE_URL" in last, last


@pytest.mark.parametrize("paused_database", ["first-purge"], indirect=True)
def test_omnet_serve_starts_when_the_database_stops_answering_after_its_check(
    tmp_path: Path, paused_database: tuple[str, str]
):
    """The schema check passed: the API runs, says in one line that its first purge of
    expired jobs failed, and answers 503 until the database is back."""
    url, _where = paused_database
    serve = _serve(tmp_path, url)
    try:
        base = f"http://127.0.0.1:{serve.args[-1]}"

        def up() -> bool:
            assert serve.poll() is None, serve.communicate()[1]
            try:
                return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, STARTUP_S + BOUND_S, "omnet serve to answer")
        _assert_database_unavailable(httpx.get(f"{base}/v1/jobs", timeout=BOUND_S + SLACK_S))
    finally:
        serve.terminate()
        _, stderr = serve.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr
    assert "purging expired jobs failed, the job database did not answer" in stderr, stderr


def test_omnet_serve_on_a_database_that_refuses_exits_with_one_line(tmp_path: Path):
    port = free_port()  # nothing listens there
    serve = _serve(tmp_path, f"postgresql+psycopg://omnet:db-secret@127.0.0.1:{port}/omnet")
    try:
        _, stderr = serve.communicate(timeout=STARTUP_S + BOUND_S)
    finally:
        serve.kill()
    assert serve.returncode == 1, stderr
    assert "Traceback" not in stderr and "db-secret" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"omnet serve: error: the job database (PostgreSQL at 127.0.0.1:{port}, database "
        "omnet) cannot be used: "
    ), last
    assert "check OMNET_DATABASE_URL" in last, last
