"""Completion webhooks through the real service: a uvicorn API, a Celery worker on Redis,
and a local HTTP receiver that checks every signature with the Standard Webhooks
reference library and answers 500 to the first two attempts at each event.

The deployment allows http and loopback targets (the receiver is on 127.0.0.1) and
retries after 0.2 s, 0.4 s ... (at most 1 s), so that the retries take well under a
second. A second API process with the default rules shows the submission-time refusal.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.service.support import Api, Phantom, Stack, redis_env, wait_until
from tests.service.support import stack as make_stack

SECRET = "whsec_" + base64.b64encode(b"omnet-webhook-test-key-32-bytes!").decode()
#: The receiver fails this many attempts at each event before it answers 200.
FAILURES = 2


@dataclass
class Received:
    """One request the receiver got, and what it answered."""

    webhook_id: str
    body: dict[str, Any]
    path: str
    answer: int


@dataclass
class Receiver:
    """A threaded local HTTP server that records the signed webhooks it receives."""

    secret: str
    requests: list[Received] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def start(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = dict(self.headers.items())
                try:
                    body = Webhook(receiver.secret).verify(raw, headers)
                except WebhookVerificationError as exc:
                    with receiver.lock:
                        receiver.unverified.append(f"{self.path}: {exc}")
                    self._answer(400)
                    return
                msg_id = headers["webhook-id"]
                with receiver.lock:
                    earlier = sum(r.webhook_id == msg_id for r in receiver.requests)
                    answer = 500 if earlier < FAILURES else 200
                    receiver.requests.append(Received(msg_id, body, self.path, answer))
                self._answer(answer)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True, name="receiver").start()
        return server

    def of(self, webhook_id: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.webhook_id == webhook_id]

    def for_job(self, job_id: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.body["data"]["id"] == job_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver(SECRET)
    server = receiver.start()
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, redis_url, queue_prefix, tiny_checkpoint) -> Iterator[Stack]:
    env = redis_env(
        redis_url,
        f"{queue_prefix}-hooks",
        tiny_checkpoint,
        OMNET_WEBHOOK_SECRETS=f"alice:{SECRET}",
        OMNET_WEBHOOK_ALLOW_HTTP="true",
        OMNET_WEBHOOK_ALLOW_PRIVATE="true",
        OMNET_WEBHOOK_BACKOFF_S="0.2",
        OMNET_WEBHOOK_BACKOFF_MAX_S="1",
        OMNET_WEBHOOK_POLL_S="0.2",
        OMNET_WEBHOOK_TIMEOUT_S="5",
    )
    with make_stack("webhooks", tmp_path_factory.mktemp("webhooks"), env) as s:
        s.wait_api(s.start_api())
        yield s


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    return deployment.apis[0]


@pytest.fixture(scope="module")
def cancelled(api: Api, phantom: Phantom, receiver: Receiver) -> str:
    """A job cancelled while queued: submitted and cancelled before any worker runs."""
    alice = api.client("alice")
    data = {"callback_url": f"{receiver.url}/cancelled"}
    response = alice.post("/v1/jobs", files=phantom.files(), data=data)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deleted = alice.delete(f"/v1/jobs/{job_id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["state"] == "cancelled"
    # Recorded with the cancellation; nothing sends it until a worker runs.
    [delivery] = deleted.json()["deliveries"]
    assert (delivery["event"], delivery["status"], delivery["attempts"]) == (
        "job.cancelled",
        "pending",
        0,
    )
    return str(job_id)


@pytest.fixture(scope="module")
def worker(deployment: Stack, cancelled: str) -> str:
    return deployment.wait_worker(deployment.start_worker("worker"))


def _settled(deployment: Stack, client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's status once none of its deliveries is pending."""

    def settled() -> dict[str, Any] | None:
        status = client.get(f"/v1/jobs/{job_id}").json()
        deliveries = status["deliveries"]
        return status if deliveries and all(d["status"] != "pending" for d in deliveries) else None

    return wait_until(settled, 60, f"the webhook of job {job_id} to be delivered", deployment)


def _assert_delivered_once(receiver: Receiver, delivery: dict[str, Any]) -> list[Received]:
    """The event reached the receiver FAILURES + 1 times under one webhook-id, with one
    body, and was answered 200 exactly once (the last time)."""
    assert receiver.unverified == []
    got = receiver.of(delivery["id"])
    assert [r.answer for r in got] == [500] * FAILURES + [200]
    assert all(r.body == got[0].body for r in got)
    assert (delivery["status"], delivery["attempts"]) == ("delivered", FAILURES + 1)
    assert (delivery["last_status_code"], delivery["last_error"]) == (200, None)
    assert delivery["finished_at"] is not None and delivery["next_attempt_at"] is None
    return got


def test_succeeded_job_event_is_signed_retried_and_delivered_once(
    deployment, api, phantom, receiver, worker
):
    alice = api.client("alice")
    url = f"{receiver.url}/hooks/omnet?tenant=alice"
    response = alice.post(
        "/v1/jobs", files=phantom.files(), data={"callback_url": url, "preview": "false"}
    )
    assert response.status_code == 202, response.text
    job_id, status_url = response.json()["id"], response.json()["status_url"]
    deployment.wait_state(alice, job_id, ("succeeded",), timeout=120)
    status = _settled(deployment, alice, job_id)
    assert status["options"]["callback_url"] == url

    [delivery] = status["deliveries"]
    assert (delivery["event"], delivery["url"]) == ("job.succeeded", url)
    got = _assert_delivered_once(receiver, delivery)
    assert {r.path for r in got} == {"/hooks/omnet?tenant=alice"}
    body = got[0].body
    assert body["type"] == "job.succeeded" and body["timestamp"].endswith("Z")
    assert body["data"] == {
        "id": job_id,
        "state": "succeeded",
        "status_url": status_url,
        "error": None,
        "volumes_ml": status["metrics"]["volumes_ml"],
    }
    # Delivered means done: no attempt follows (the longest back-off is 1 s).
    threading.Event().wait(1.5)
    assert receiver.for_job(job_id) == got


def test_cancelled_job_event_is_delivered(deployment, api, receiver, cancelled, worker):
    alice = api.client("alice")
    status = _settled(deployment, alice, cancelled)
    assert status["state"] == "cancelled" and status["attempts"] == 0
    [delivery] = status["deliveries"]
    assert delivery["event"] == "job.cancelled"
    got = _assert_delivered_once(receiver, delivery)
    assert got[0].path == "/cancelled"
    assert got[0].body["type"] == "job.cancelled"
    assert got[0].body["data"]["state"] == "cancelled"
    assert got[0].body["data"]["error"] is None and got[0].body["data"]["volumes_ml"] is None
    assert receiver.for_job(cancelled) == got


def test_targets_are_refused_at_submission(deployment, api, phantom, receiver):
    strict = deployment.wait_api(
        deployment.start_api("api-strict", OMNET_WEBHOOK_ALLOW_PRIVATE="false")
    )
    alice, bob = strict.client("alice"), api.client("bob")
    before = alice.get("/v1/jobs").json()["total"]
    port = receiver.url.rsplit(":", 1)[1]
    for client, url, code, shown in [
        (alice, f"http://127.0.0.1:{port}/hook", "callback_url_not_allowed", "loopback"),
        (alice, f"http://localhost:{port}/hook", "callback_url_not_allowed", "loopback"),
        (alice, "http://10.0.0.8/hook", "callback_url_not_allowed", "private"),
        (alice, "http://169.254.169.254/latest", "callback_url_not_allowed", "link-local"),
        (alice, "ftp://hooks.example.org/", "bad_callback_url", "https://"),
        (bob, f"{receiver.url}/hook", "webhooks_not_configured", "OMNET_WEBHOOK_SECRETS"),
    ]:
        response = client.post("/v1/jobs", files=phantom.files(), data={"callback_url": url})
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["code"] == code, (url, error)
        assert shown in error["message"], (url, error)
    assert alice.get("/v1/jobs").json()["total"] == before, "a refused submission made a job"
