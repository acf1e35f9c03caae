"""Completion webhooks: the service POSTs an event to a job's ``callback_url`` when the
job succeeds, fails or is cancelled.

An event goes through these steps:

- :class:`CallbackRules` checks a ``callback_url`` when the job is submitted (the API
  answers 400 with the :class:`CallbackRefusedError`'s code);
- :func:`completion_event` makes the event where the job's state changes (the worker's
  runner on success and failure, the API on cancellation), and the job store records it
  in the same transaction as the change (:meth:`service.db.JobStore.finish`,
  :meth:`~service.db.JobStore.cancel`), so an event is never lost nor made twice;
- :func:`service.deliveries.run_deliveries`, a thread of every worker process, claims
  the events that are due (one sender per attempt) and makes each attempt with
  :func:`send_attempt`: a POST signed the Standard Webhooks way (:func:`sign`) to an
  address checked again as it is sent (:meth:`TargetPolicy.resolve`); it records what
  came of it: delivered, another attempt after an exponential back-off, or failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from service.config import Settings, decode_webhook_secret
from service.db import AttemptResult, Delivery, Job, JobState, NewDelivery

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The event type of each final state.
EVENT_TYPES = {
    JobState.SUCCEEDED: "job.succeeded",
    JobState.FAILED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
}
#: Longest callback URL accepted.
MAX_URL_LENGTH = 2048
USER_AGENT = "omnet-webhooks/0.1"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NUMERIC_HOST = re.compile(r"[0-9a-fx.]+")


class CallbackRefusedError(Exception):
    """A callback URL that may not be used; ``code`` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------ where events may go
@dataclass(frozen=True)
class Target:
    """A parsed callback URL."""

    scheme: str  # http or https
    host: str  # lower case, ASCII (IDNA), no brackets around an IPv6 address
    port: int
    path: str  # path and query, at least "/"


def address_refusal(address: IPAddress, allow_private: bool) -> str | None:
    """Why a callback may not be sent to ``address`` (a few words), or None when it may.

    Public (globally routable) addresses may be used. Loopback, private and other
    special-purpose ones (shared 100.64.0.0/10, documentation, benchmarking ...) only
    with ``allow_private``. Unspecified, multicast, link-local (where cloud metadata
    services answer) and reserved ones (240.0.0.0/4, broadcast, unassigned IPv6) never.
    An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64, Teredo) is judged by
    the IPv4 address.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None:
            return address_refusal(embedded, allow_private)
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_loopback:
        return None if allow_private else "a loopback address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_global or allow_private:
        return None
    if address.is_private:
        return "a private address"
    return "a non-public address"


def ip_literal(host: str) -> IPAddress | None:
    """The address a host name spells, or None for a name to resolve. Besides the usual
    forms this knows the legacy IPv4 ones that resolvers accept (``127.1``,
    ``0x7f000001``, ``2130706433``), so they cannot slip past the submission check."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def parse_target(url: str) -> Target:
    """The parts of a callback URL that sending needs.

    Raises:
        CallbackRefusedError: ``bad_callback_url``, saying what is wrong.
    """

    def bad(why: str) -> CallbackRefusedError:
        return CallbackRefusedError("bad_callback_url", f"callback_url {why}")

    if not url:
        raise bad("is empty; send an https:// URL or leave the field out")
    if len(url) > MAX_URL_LENGTH:
        raise bad(f"is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise bad("contains white space or control characters; percent-encode them")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise bad(f"must be an absolute https:// URL; got {url[:100]!r}")
    if "@" in parts.netloc:
        raise bad("must not carry a user name or password (events are signed instead)")
    if parts.fragment:
        raise bad("must not have a #fragment")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise bad("has an invalid port") from None
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise bad("has no host")
    if ip_literal(host) is None:
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise bad(f"has an invalid host name {host!r}") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, path)


@dataclass(frozen=True)
class TargetPolicy:
    """Where the operator lets callbacks go (``OMNET_WEBHOOK_ALLOW_HTTP``,
    ``OMNET_WEBHOOK_ALLOW_PRIVATE``, ``OMNET_WEBHOOK_ALLOWED_HOSTS``)."""

    allow_http: bool = False
    allow_private: bool = False
    #: Host names allowed; ``.example.org`` allows it and its subdomains. Empty: any.
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> TargetPolicy:
        return cls(
            settings.webhook_allow_http, settings.webhook_allow_private, settings.webhook_hosts()
        )

    def _host_allowed(self, host: str) -> bool:
        for entry in self.allowed_hosts:
            suffix = entry[1:] if entry.startswith("*.") else entry
            if suffix.startswith("."):
                if host == suffix[1:] or host.endswith(suffix):
                    return True
            elif host == entry:
                return True
        return False

    def check(self, url: str) -> Target:
        """Parses ``url`` and checks what can be checked without resolving its host: the
        scheme, the host allowlist, and the address of a host that is one (or localhost).

        Raises:
            CallbackRefusedError: ``bad_callback_url`` or ``callback_url_not_allowed``.
        """
        target = parse_target(url)

        def refuse(why: str) -> CallbackRefusedError:
            return CallbackRefusedError("callback_url_not_allowed", f"callback_url {why}")

        if target.scheme == "http" and not self.allow_http:
            raise refuse("must use https (this service does not send events over plain http)")
        if self.allowed_hosts and not self._host_allowed(target.host):
            raise refuse(
                f"host {target.host!r} is not one this service sends events to; ask the "
                "operator to add it to OMNET_WEBHOOK_ALLOWED_HOSTS"
            )
        address = ip_literal(target.host)
        if address is None and (target.host == "localhost" or target.host.endswith(".localhost")):
            address = ipaddress.IPv4Address("127.0.0.1")
        if address is not None:
            reason = address_refusal(address, self.allow_private)
            if reason is not None:
                raise refuse(
                    f"host {target.host!r} is {reason}; events go to public addresses only"
                )
        return target

    def resolve(self, target: Target) -> list[str]:
        """The addresses of ``target``'s host, every one of them checked (a name with one
        forbidden address is refused, whatever its others). Connect to these, not to the
        name, so that a second DNS answer cannot differ from the checked one.

        Raises:
            CallbackRefusedError: ``callback_url_not_allowed``.
            OSError: the name does not resolve (now).
        """
        literal = ip_literal(target.host)
        if literal is not None:
            found: list[IPAddress] = [literal]
        else:
            infos = socket.getaddrinfo(
                target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
            found = []
            for info in infos:
                address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
                if address not in found:
                    found.append(address)
        if not found:
            raise OSError(f"{target.host} has no address")
        for address in found:
            reason = address_refusal(address, self.allow_private)
            if reason is not None:
                raise CallbackRefusedError(
                    "callback_url_not_allowed",
                    f"callback_url host {target.host!r} resolves to {address}, {reason}; "
                    "events go to public addresses only",
                )
        return [str(a) for a in found]


@dataclass(frozen=True)
class CallbackRules:
    """What a submitted ``callback_url`` must satisfy, for one owner."""

    policy: TargetPolicy
    #: The owner has a signing secret (events are never sent unsigned).
    signed: bool

    @classmethod
    def for_owner(cls, settings: Settings, owner: str) -> CallbackRules:
        return cls(TargetPolicy.from_settings(settings), bool(settings.webhook_secrets_of(owner)))

    def check(self, url: str) -> str:
        """The callback URL to record (stripped of surrounding blanks).

        Raises:
            CallbackRefusedError: ``webhooks_not_configured``, ``bad_callback_url`` or
                ``callback_url_not_allowed``.
        """
        if not self.signed:
            raise CallbackRefusedError(
                "webhooks_not_configured",
                "no webhook signing secret is configured for your API key, so this service "
                "cannot send you events; ask the operator to add one to "
                "OMNET_WEBHOOK_SECRETS, or leave out callback_url",
            )
        url = url.strip()
        self.policy.check(url)
        return url


# ------------------------------------------------------------------ events and signatures
def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The Standard Webhooks signature ``v1,<base64 HMAC-SHA256>`` of
    ``{msg_id}.{timestamp}.{body}`` with the key of ``secret`` (``whsec_<base64>``)."""
    key = decode_webhook_secret(secret)
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(secrets: list[str], msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The ``webhook-*`` headers of one attempt: one signature per secret, separated by
    spaces (an owner whose secret is being rotated has two)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in secrets),
    }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def completion_event(
    job: Job,
    state: JobState,
    error: tuple[str, str] | None = None,
    volumes_ml: dict[str, float] | None = None,
) -> NewDelivery | None:
    """The event that ``job`` reached final ``state``, or None when the job has no
    ``callback_url``. ``error`` is the failure's (code, message); ``volumes_ml`` the
    region volumes of a success. The body is fixed here: every attempt sends it as is.
    """
    url = job.options.get("callback_url")
    if not url:
        return None
    event = EVENT_TYPES[state]
    payload = {
        "type": event,
        "timestamp": _iso(datetime.now(UTC)),
        "data": {
            "id": job.id,
            "state": str(state),
            "status_url": job.options.get("status_url"),
            "error": {"code": error[0], "message": error[1]} if error else None,
            "volumes_ml": volumes_ml if state == JobState.SUCCEEDED else None,
        },
    }
    return NewDelivery(
        id=f"msg_{uuid.uuid4().hex}",
        job_id=job.id,
        owner=job.owner,
        event=event,
        url=url,
        body=json.dumps(payload, separators=(",", ":")),
    )


# ------------------------------------------------------------------ sending
class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to ``address``, the checked address of the URL's host: the name is not
    looked up again, while the Host header, the TLS server name and the certificate
    check use the name."""

    def __init__(
        self, target: Target, address: str, timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.default_port = 443 if tls is not None else 80  # no ":443" in the Host header
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._tls is not None:
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.host)

    def cut(self) -> None:
        """Ends a blocked exchange from another thread (the deadline passed)."""
        sock = self.sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def post(
    target: Target, addresses: list[str], headers: dict[str, str], body: bytes, timeout_s: float
) -> tuple[int, str, float | None]:
    """POSTs ``body`` to ``target`` at the first of ``addresses`` that answers; the whole
    exchange (connecting, TLS, sending, the status line and headers) ends after
    ``timeout_s``. Redirects are not followed. Returns the status code, its reason and
    the Retry-After in seconds.

    Raises:
        TimeoutError: no answer within ``timeout_s``.
        OSError, http.client.HTTPException: the connection failed.
    """
    deadline = time.monotonic() + timeout_s
    tls = ssl.create_default_context() if target.scheme == "https" else None
    error: Exception = TimeoutError(f"no answer within {timeout_s:g} s")
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        conn = _PinnedConnection(target, address, remaining, tls)
        timer = threading.Timer(remaining, conn.cut)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", target.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.reason, _retry_after(response.getheader("Retry-After"))
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline or isinstance(exc, TimeoutError):
                raise TimeoutError(f"no answer within {timeout_s:g} s") from exc
            error = exc
            if conn.sock is not None:  # connected, then failed: not an address problem
                raise
        finally:
            timer.cancel()
            conn.close()
    raise error


def send_attempt(delivery: Delivery, settings: Settings) -> AttemptResult:
    """One attempt at ``delivery``: the target checked and resolved again, the body
    signed with the owner's secret(s) and the attempt's time, and POSTed."""
    secrets = settings.webhook_secrets_of(delivery.owner)
    if not secrets:
        return AttemptResult(
            False,
            error="no webhook secret is configured for this job's owner (OMNET_WEBHOOK_SECRETS)",
            retry=False,
        )
    policy = TargetPolicy.from_settings(settings)
    try:
        target = policy.check(delivery.url)
        addresses = policy.resolve(target)
    except CallbackRefusedError as exc:
        return AttemptResult(False, error=exc.message, retry=False)
    except OSError as exc:
        return AttemptResult(False, error=f"cannot resolve the callback host: {exc}")
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Connection": "close",
        **signature_headers(secrets, delivery.id, int(time.time()), delivery.body),
    }
    try:
        status, reason, retry_after = post(
            target, addresses, headers, delivery.body.encode(), settings.webhook_timeout_s
        )
    except TimeoutError as exc:
        return AttemptResult(False, error=str(exc))
    except (OSError, http.client.HTTPException) as exc:
        return AttemptResult(False, error=f"{type(exc).__name__}: {exc}"[:500])
    if 200 <= status < 300:
        return AttemptResult(True, status)
    return AttemptResult(False, status, f"HTTP {status} {reason}".strip()[:500], True, retry_after)
