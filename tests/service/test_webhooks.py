"""service/webhooks.py: signatures, target and address checks, the retry schedule, one
attempt against a real local HTTP server, and the delivery records of service/db.py.

tests/service/test_api_webhooks.py runs the whole path through real processes.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from service import webhooks
from service.config import Settings
from service.db import DeliveryStatus, JobState, JobStore, utcnow
from service.deliveries import deliver, retry_delay
from service.webhooks import (
    CallbackRefusedError,
    CallbackRules,
    TargetPolicy,
    address_refusal,
    completion_event,
    ip_literal,
    send_attempt,
    sign,
    signature_headers,
)

SECRET = "whsec_" + base64.b64encode(b"unit-test-webhook-key-0123456789").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"rotated-webhook-key-abcdefghijkl").decode()


# --------------------------------------------------------------------------- signing
def test_signature_of_the_standard_webhooks_test_vector():
    # The example of the Standard Webhooks specification and its reference libraries.
    signature = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        '{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_verify_with_the_reference_library_for_each_rotated_secret():
    body = json.dumps({"type": "job.succeeded", "data": {"id": "j"}})
    headers = signature_headers([SECRET, OTHER_SECRET], "msg_1", int(time.time()), body)
    assert headers["webhook-id"] == "msg_1"
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, OTHER_SECRET):
        assert Webhook(secret).verify(body, headers) == json.loads(body)
    tampered = body.replace('"j"', '"k"')
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(tampered, headers)


def test_secret_settings():
    settings = Settings(webhook_secrets=f"alice:{SECRET}, alice:{OTHER_SECRET},*:{OTHER_SECRET}")
    assert settings.webhook_secrets_of("alice") == [SECRET, OTHER_SECRET]
    assert settings.webhook_secrets_of("bob") == [OTHER_SECRET]  # the '*' entry
    assert Settings().webhook_secrets_of("alice") == []
    assert "whsec" not in repr(settings)
    short = "whsec_" + base64.b64encode(b"too-short").decode()
    for bad, shown in [
        (f"alice:{short}", "at least 24 bytes"),
        ("alice:secret-without-prefix", "must start with 'whsec_'"),
        ("alice:whsec_not*base64!", "base64"),
        (SECRET, "owner:whsec_"),
    ]:
        with pytest.raises(ValidationError) as info:
            Settings(webhook_secrets=bad)
        assert shown in str(info.value)
        assert bad not in str(info.value), "the error shows the secret"


# --------------------------------------------------------------------------- addresses
@pytest.mark.parametrize(
    ("address", "allow_private", "refused"),
    [
        ("93.184.215.14", False, None),
        ("2606:4700:4700::1111", False, None),
        ("::ffff:93.184.215.14", False, None),
        ("127.0.0.1", False, "loopback"),
        ("127.0.0.1", True, None),
        ("::1", False, "loopback"),
        ("::1", True, None),
        ("10.1.2.3", False, "private"),
        ("172.16.0.9", False, "private"),
        ("192.168.1.1", False, "private"),
        ("192.168.1.1", True, None),
        ("fd12:3456::1", False, "private"),
        ("100.64.0.1", False, "non-public"),
        ("100.64.0.1", True, None),
        ("::ffff:127.0.0.1", False, "loopback"),  # IPv4-mapped
        ("64:ff9b::a00:1", False, "private"),  # NAT64 of 10.0.0.1
        ("2002:a00:1::", False, "private"),  # 6to4 of 10.0.0.1
        ("169.254.169.254", True, "link-local"),  # cloud metadata: never
        ("fe80::1", True, "link-local"),
        ("0.0.0.0", True, "unspecified"),
        ("::", True, "unspecified"),
        ("224.0.0.1", True, "multicast"),
        ("240.0.0.1", True, "reserved"),
        ("255.255.255.255", True, "reserved"),
    ],
)
def test_address_refusal(address, allow_private, refused):
    reason = address_refusal(ipaddress.ip_address(address), allow_private)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("::1", "::1"),
        ("example.org", None),
        ("abc.def", None),
    ],
)
def test_ip_literal_knows_the_forms_resolvers_accept(host, address):
    found = ip_literal(host)
    assert (str(found) if found else None) == address


STRICT = TargetPolicy()
LOCAL = TargetPolicy(allow_http=True, allow_private=True)
LISTED = TargetPolicy(allowed_hosts=(".example.org", "api.other.net"))


@pytest.mark.parametrize(
    ("policy", "url", "code"),
    [
        (STRICT, "https://hooks.example.org/omnet?token=abc", None),
        (STRICT, "https://xn--mnchen-3ya.de/hook", None),
        (STRICT, "http://hooks.example.org/", "callback_url_not_allowed"),
        (STRICT, "https://127.0.0.1/", "callback_url_not_allowed"),
        (STRICT, "https://127.1:8443/", "callback_url_not_allowed"),
        (STRICT, "https://[::1]/", "callback_url_not_allowed"),
        (STRICT, "https://localhost/", "callback_url_not_allowed"),
        (STRICT, "https://api.localhost/", "callback_url_not_allowed"),
        (STRICT, "https://10.0.0.7/", "callback_url_not_allowed"),
        (STRICT, "https://169.254.169.254/latest/meta-data", "callback_url_not_allowed"),
        (STRICT, "https://user:pw@hooks.example.org/", "bad_callback_url"),
        (STRICT, "ftp://hooks.example.org/", "bad_callback_url"),
        (STRICT, "hooks.example.org/x", "bad_callback_url"),
        (STRICT, "https:///x", "bad_callback_url"),
        (STRICT, "https://hooks.example.org:99999/", "bad_callback_url"),
        (STRICT, "https://hooks.example.org/#frag", "bad_callback_url"),
        (STRICT, "https://hooks.example .org/", "bad_callback_url"),
        (STRICT, "", "bad_callback_url"),
        (STRICT, "https://example.org/" + "a" * 2100, "bad_callback_url"),
        (LOCAL, "http://127.0.0.1:8080/hook", None),
        (LOCAL, "http://localhost:8080/hook", None),
        (LOCAL, "https://169.254.169.254/", "callback_url_not_allowed"),
        (LISTED, "https://example.org/", None),
        (LISTED, "https://a.b.example.org/", None),
        (LISTED, "https://api.other.net/", None),
        (LISTED, "https://evil-example.org/", "callback_url_not_allowed"),
        (LISTED, "https://x.api.other.net/", "callback_url_not_allowed"),
        (LISTED, "https://10.0.0.7/", "callback_url_not_allowed"),
    ],
)
def test_callback_url_checks(policy, url, code):
    if code is None:
        target = policy.check(url)
        assert target.scheme in ("http", "https") and target.path.startswith("/")
    else:
        with pytest.raises(CallbackRefusedError) as info:
            policy.check(url)
        assert info.value.code == code


def test_check_keeps_the_port_and_query():
    target = STRICT.check("https://Hooks.Example.org:8443/a/b?x=1&y=2")
    assert (target.host, target.port, target.path) == ("hooks.example.org", 8443, "/a/b?x=1&y=2")
    assert STRICT.check("https://hooks.example.org").path == "/"


def test_callback_rules_need_a_secret_for_the_owner():
    settings = Settings(webhook_secrets=f"alice:{SECRET}")
    url = " https://hooks.example.org/x "
    assert CallbackRules.for_owner(settings, "alice").check(url) == url.strip()
    with pytest.raises(CallbackRefusedError) as info:
        CallbackRules.for_owner(settings, "bob").check(url)
    assert info.value.code == "webhooks_not_configured"


def test_resolve_refuses_a_name_with_any_forbidden_address(monkeypatch):
    def fake_getaddrinfo(host, port, *args, **kwargs):
        answers = {"mixed.example": ["93.184.215.14", "10.0.0.5"], "public.example": ["1.1.1.1"]}
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert STRICT.resolve(STRICT.check("https://public.example/")) == ["1.1.1.1"]
    with pytest.raises(CallbackRefusedError, match=r"resolves to 10\.0\.0\.5, a private"):
        STRICT.resolve(STRICT.check("https://mixed.example/"))
    assert LOCAL.resolve(LOCAL.check("https://mixed.example/")) == ["93.184.215.14", "10.0.0.5"]


# --------------------------------------------------------------------------- retries
def test_retry_schedule_doubles_up_to_the_cap_with_jitter_and_retry_after():
    exact = [retry_delay(n, 10.0, 3600.0, draw=lambda: 0.0) for n in range(1, 11)]
    assert exact == [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600]
    assert retry_delay(3, 10.0, 3600.0, draw=lambda: 1.0) == pytest.approx(32.0)  # 20% less
    assert retry_delay(1, 10.0, 3600.0, retry_after_s=120.0, draw=lambda: 0.0) == 120.0
    assert retry_delay(1, 10.0, 3600.0, retry_after_s=1e9, draw=lambda: 0.0) == 3600.0
    assert retry_delay(10_000, 10.0, 60.0, draw=lambda: 0.0) == 60.0


# --------------------------------------------------------------------------- sending
class _Receiver:
    """A local HTTP server answering each POST with the next of ``answers``."""

    def __init__(
        self, answers: list[tuple[int, dict[str, str]]], tls: ssl.SSLContext | None = None
    ) -> None:
        self.answers = answers
        self.requests: list[tuple[str, dict[str, str], str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                receiver.requests.append((self.path, dict(self.headers.items()), body))
                n = min(len(receiver.requests), len(receiver.answers))
                status, headers = receiver.answers[n - 1]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    store = JobStore(database_url)
    yield store
    store.engine.dispose()


def _settings(**extra: object) -> Settings:
    values: dict[str, object] = {
        "webhook_secrets": f"alice:{SECRET}",
        "webhook_allow_http": True,
        "webhook_allow_private": True,
        "webhook_timeout_s": 2.0,
        "webhook_backoff_s": 0.01,
        "webhook_max_attempts": 3,
        **extra,
    }
    return Settings(**values)  # type: ignore[arg-type]


def _cancelled_with_callback(store: JobStore, url: str) -> str:
    job, _ = store.create("alice", {"callback_url": url, "status_url": "s"}, {}, "q")
    event = completion_event(job, JobState.CANCELLED)
    assert store.cancel(job.id, "alice", timedelta(hours=1), event) is not None
    return job.id


def test_event_body_and_record_made_with_the_state_change(store):
    options = {"callback_url": "https://h.example/x", "status_url": "S"}
    job, _ = store.create("alice", options, {}, "q")
    plain, _ = store.create("alice", {}, {}, "q")
    assert completion_event(plain, JobState.CANCELLED) is None
    event = completion_event(job, JobState.CANCELLED)
    assert event is not None and event.id.startswith("msg_")
    # Recorded only by the call that changes the state.
    store.cancel(job.id, "alice", timedelta(hours=1), event)
    store.cancel(job.id, "alice", timedelta(hours=1), completion_event(job, JobState.CANCELLED))
    [record] = store.deliveries(job.id)
    assert (record.id, record.event, record.status, record.attempts) == (
        event.id,
        "job.cancelled",
        DeliveryStatus.PENDING,
        0,
    )
    body = json.loads(record.body)
    assert body["type"] == "job.cancelled"
    assert datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    assert body["data"] == {
        "id": job.id,
        "state": "cancelled",
        "status_url": "S",
        "error": None,
        "volumes_ml": None,
    }
    failed = completion_event(job, JobState.FAILED, error=("internal_error", "boom"))
    assert failed is not None
    assert json.loads(failed.body)["data"]["error"] == {"code": "internal_error", "message": "boom"}


def test_claims_are_exclusive_and_outcomes_need_the_claim(store):
    job_id = _cancelled_with_callback(store, "https://h.example/x")
    [first] = store.claim_deliveries(10, lease_s=60)
    assert first.attempts == 1 and first.claim
    assert store.claim_deliveries(10, lease_s=60) == []  # held
    assert store.end_delivery(first, DeliveryStatus.PENDING, 500, "HTTP 500", utcnow())
    [second] = store.claim_deliveries(10, lease_s=60)
    assert second.attempts == 2 and second.claim != first.claim
    assert not store.end_delivery(first, DeliveryStatus.DELIVERED, 200, None)  # stale claim
    assert store.end_delivery(second, DeliveryStatus.DELIVERED, 200, None)
    [done] = store.deliveries(job_id)
    assert (done.status, done.attempts, done.last_status_code, done.claim) == (
        DeliveryStatus.DELIVERED,
        2,
        200,
        None,
    )
    assert store.claim_deliveries(10, lease_s=60) == []
    store.delete(job_id)
    assert store.deliveries(job_id) == []


def test_an_expired_claim_is_taken_over(store):
    _cancelled_with_callback(store, "https://h.example/x")
    [first] = store.claim_deliveries(10, lease_s=0.05)
    time.sleep(0.1)
    [again] = store.claim_deliveries(10, lease_s=60)
    assert again.id == first.id and again.attempts == 2


def test_a_pending_event_of_a_deleted_job_is_still_sent_then_removed(store):
    receiver = _Receiver([(200, {})])
    try:
        job_id = _cancelled_with_callback(store, f"{receiver.url}/hook")
        store.delete(job_id)
        [delivery] = store.claim_deliveries(10, lease_s=60)
        assert deliver(delivery, _settings(), store) == DeliveryStatus.DELIVERED
        assert len(receiver.requests) == 1
        assert store.deliveries(job_id) == []
    finally:
        receiver.close()


def test_attempts_retry_then_deliver_and_are_signed(store):
    receiver = _Receiver([(500, {}), (503, {"Retry-After": "0"}), (200, {})])
    try:
        job_id = _cancelled_with_callback(store, f"{receiver.url}/hook?k=v")
        settings = _settings()
        outcomes = []
        for _ in range(3):
            [delivery] = store.claim_deliveries(1, lease_s=60)
            outcomes.append(deliver(delivery, settings, store))
            time.sleep(0.05)  # past the (tiny) back-off
        assert outcomes == ["pending", "pending", "delivered"]
        paths = [path for path, _, _ in receiver.requests]
        assert paths == ["/hook?k=v"] * 3
        ids = {headers["webhook-id"] for _, headers, _ in receiver.requests}
        bodies = {body for _, _, body in receiver.requests}
        assert len(ids) == 1 and len(bodies) == 1
        for _, headers, body in receiver.requests:
            Webhook(SECRET).verify(body, headers)
            assert headers["Content-Type"] == "application/json"
        [record] = store.deliveries(job_id)
        assert (record.status, record.attempts, record.last_status_code) == ("delivered", 3, 200)
    finally:
        receiver.close()


def test_attempts_stop_at_the_maximum(store):
    receiver = _Receiver([(500, {})] * 3)
    try:
        job_id = _cancelled_with_callback(store, receiver.url)
        settings = _settings(webhook_max_attempts=2)
        statuses = []
        for _ in range(2):
            [delivery] = store.claim_deliveries(1, lease_s=60)
            statuses.append(deliver(delivery, settings, store))
            time.sleep(0.05)
        assert statuses == ["pending", "failed"]
        assert store.claim_deliveries(1, lease_s=60) == []
        [record] = store.deliveries(job_id)
        assert (record.attempts, record.last_status_code, record.last_error) == (
            2,
            500,
            "HTTP 500 Internal Server Error",
        )
        assert record.finished_at is not None and record.next_attempt_at is None
    finally:
        receiver.close()


def test_send_time_check_refuses_loopback_without_sending(store):
    receiver = _Receiver([(200, {})])
    try:
        _cancelled_with_callback(store, f"{receiver.url}/hook")
        [delivery] = store.claim_deliveries(1, lease_s=60)
        result = send_attempt(delivery, _settings(webhook_allow_private=False))
        assert not result.delivered and not result.retry
        assert "loopback" in (result.error or "")
        no_secret = send_attempt(delivery, _settings(webhook_secrets=""))
        assert not no_secret.retry and "OMNET_WEBHOOK_SECRETS" in (no_secret.error or "")
        assert receiver.requests == []
    finally:
        receiver.close()


def test_redirects_are_not_followed(store):
    receiver = _Receiver([(302, {"Location": "http://169.254.169.254/"})])
    try:
        _cancelled_with_callback(store, receiver.url)
        [delivery] = store.claim_deliveries(1, lease_s=60)
        result = send_attempt(delivery, _settings())
        assert (result.delivered, result.status_code, result.retry) == (False, 302, True)
        assert len(receiver.requests) == 1
    finally:
        receiver.close()


def test_a_receiver_that_never_answers_times_out(store):
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        _cancelled_with_callback(store, f"http://127.0.0.1:{port}/")
        [delivery] = store.claim_deliveries(1, lease_s=60)
        started = time.monotonic()
        result = send_attempt(delivery, _settings(webhook_timeout_s=0.5))
        took = time.monotonic() - started
    assert not result.delivered and result.retry
    assert result.error == "no answer within 0.5 s"
    assert took < 3.0


def test_a_refused_connection_is_retried(store):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        _cancelled_with_callback(store, f"http://127.0.0.1:{port}/")
        [delivery] = store.claim_deliveries(1, lease_s=60)
        result = send_attempt(delivery, _settings())
    assert not result.delivered and result.retry
    assert "ConnectionRefusedError" in (result.error or "")


@pytest.fixture(scope="module")
def localhost_cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for the name localhost (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; the TLS tests need it")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    subprocess.run(
        [*command, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_checks_the_certificate_against_the_host_name(store, localhost_cert, monkeypatch):
    cert, key = localhost_cert
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    receiver = _Receiver([(200, {})], tls=server_tls)
    try:
        _cancelled_with_callback(store, f"https://localhost:{receiver.port}/hook")
        [delivery] = store.claim_deliveries(1, lease_s=60)
        settings = _settings(webhook_allow_http=False)
        # An untrusted certificate: refused before anything is sent.
        untrusted = send_attempt(delivery, settings)
        assert not untrusted.delivered and "CERTIFICATE_VERIFY_FAILED" in (untrusted.error or "")
        assert receiver.requests == []
        # Trusted: sent to the checked address, the certificate matched to "localhost".
        trusting = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(webhooks.ssl, "create_default_context", lambda: trusting)
        assert send_attempt(delivery, settings).delivered
        [(path, headers, _)] = receiver.requests
        assert path == "/hook" and headers["Host"] == f"localhost:{receiver.port}"
    finally:
        receiver.close()
