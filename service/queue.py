"""The job queue that the API and the workers share: task and queue names, and the
Celery application factory, configured from :class:`service.config.Settings`.

Nothing is built at import time: the API builds its client application in
:func:`service.app.create_app`, a worker builds its own in :mod:`worker.app`.

Redis is the broker and result store when ``OMNET_BROKER_URL`` is set. Without it the
embedded mode needs no server: Celery's filesystem transport (messages are files in the
storage folder) with results in SQLite.

Delivery guarantees (docs/delivery-guarantees.md states the bounds):

* late acknowledgement (a job is acknowledged when it ends, not when it starts), one
  job prefetched per worker, and a job whose pool process dies is sent again at
  :data:`RESENT_PRIORITY` (see :mod:`service.recovery`);
* a job is sent at :data:`JOB_PRIORITY`, and sent again (its worker died, or its message
  was lost) at :data:`RESENT_PRIORITY`, which every transport serves first: Redis through
  kombu's priority lists, the embedded mode through :class:`FolderTransport`; so a job
  that lost its worker is not queued behind the jobs submitted after it;
* a message a worker holds is a lease: Redis hands it out again when it has not been
  renewed for ``visibility_timeout_s``, and every live worker renews the leases of the
  messages it holds at each heartbeat (:meth:`BrokerLedger.renew`), so a long job keeps
  its message while the messages of a dead worker come back within a minute;
* the job record is the truth: a claim with a heartbeat makes any duplicate message
  harmless (see :mod:`worker.runner`), and workers periodically re-send the jobs whose
  record says queued, or running under a silent worker, while no message for them is
  left in the broker (:meth:`BrokerLedger.held_job_ids`; e.g. after a Redis restart
  without persistence), and in embedded mode those whose message is not in the
  transport's folder (:class:`FolderLedger`: a message a worker took, and died with, is
  gone from it);
* the API's broker calls are bounded by ``broker_timeout_s`` (socket timeouts, no
  publish retries), and run off its event loop.

Task ids are job ids, so a message names its job in its headers.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import redis
from celery import Celery
from kombu.transport import filesystem
from kombu.utils.json import dumps

from service.config import Settings

#: Name of the segmentation task (the API sends it, the workers run it).
TASK_SEGMENT = "omnet.segment"
#: Kombu's Redis keys of the messages handed out and not yet acknowledged.
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"
#: Kombu's priority sub-queues (``<queue>\x06\x16<n>``) besides the queue itself.
_PRIORITY_SUFFIXES = ("", *(f"\x06\x16{n}" for n in (3, 6, 9)))
#: Message priorities: a job sent again (its worker died, or its message was lost) and a
#: new job. Kombu's Redis transport keeps one list per step of its ``priority_steps``
#: (0, 3, 6, 9; the step 0 list is the queue itself) and its consumers pop the lower step
#: first, over all their queues; :class:`FolderTransport` does the same in its folder.
RESENT_PRIORITY, JOB_PRIORITY = 0, 3


def broker_folder(settings: Settings) -> Path:
    """The embedded mode's broker: the folder under the storage folder whose files are
    the messages."""
    return (settings.storage_dir / "broker").resolve()


def make_celery(settings: Settings, include: Sequence[str] = (), client: bool = False) -> Celery:
    """A Celery application for ``settings``; ``include`` names the task modules a worker
    imports (the API only sends tasks by name and includes none). ``client`` (the API):
    every broker call gives up after ``broker_timeout_s``.

    In embedded mode this creates the filesystem transport's folders under the storage
    folder.
    """
    if settings.embedded:
        broker_dir = broker_folder(settings)
        for sub in ("queue", "processed", "control"):
            (broker_dir / sub).mkdir(parents=True, exist_ok=True)
        broker = "filesystem://localhost//"  # the host names nothing; kombu warns without one
        transport_options: dict[str, object] = {
            "data_folder_in": str(broker_dir / "queue"),
            "data_folder_out": str(broker_dir / "queue"),
            "processed_folder": str(broker_dir / "processed"),
            "control_folder": str(broker_dir / "control"),
            "store_processed": False,
        }
        backend = settings.result_backend or (
            f"db+sqlite:///{(settings.storage_dir / 'celery-results.sqlite').resolve()}"
        )
        transport: str | None = f"{__name__}:FolderTransport"  # taken over the URL's scheme
    else:
        broker = settings.broker_url or ""
        transport_options = {
            "visibility_timeout": settings.visibility_timeout_s,
            # Look for expired leases every heartbeat (kombu: interval x throttle).
            "unacked_restore_interval": settings.worker_heartbeat_s,
            "unacked_restore_throttle": 1,
        }
        if client:
            transport_options["socket_timeout"] = settings.broker_timeout_s
            transport_options["socket_connect_timeout"] = settings.broker_timeout_s
        backend = settings.result_backend or broker
        transport = None
    app = Celery("omnet", broker=broker, backend=backend, include=list(include))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport=transport,
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options if not settings.embedded else {},
        result_expires=max(1, int(settings.retention_hours * 3600)),
        task_default_queue=settings.queue("cpu"),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_time_limit=int(settings.job_time_limit_s + 120),
        task_soft_time_limit=int(settings.job_time_limit_s + 60),
        broker_connection_timeout=settings.broker_timeout_s,
    )
    return app


def send_job(
    celery: Celery, job_id: str, queue: str, retry: bool = True, resent: bool = False
) -> None:
    """Queues job ``job_id`` on ``queue`` (its task id is the job id). ``retry=False``
    fails at once, instead of retrying, when the broker does not answer. ``resent``: the
    job was sent before and lost its worker or its message; it goes before every new job
    (:data:`RESENT_PRIORITY`)."""
    celery.send_task(
        TASK_SEGMENT,
        args=[job_id],
        queue=queue,
        task_id=job_id,
        retry=retry,
        priority=RESENT_PRIORITY if resent else JOB_PRIORITY,
    )


class FolderChannel(filesystem.Channel):
    """Kombu's filesystem channel, first in first out, with :data:`RESENT_PRIORITY`
    messages served before the others.

    Its consumer takes the first message file of a queue in the sorted order of the
    names. Kombu names a message by its sending time in milliseconds and a random UUID,
    so two messages sent in the same millisecond could be served in either order; here
    a message is named ``<rank>_<time>_<uuid>.<queue>.msg``, the time in nanoseconds,
    zero-padded and strictly increasing within a process, and the rank ``0`` for a
    message at :data:`RESENT_PRIORITY` (or at no priority), ``1`` for the others: every
    message sent again sorts before every new one, and each kind is served in the order
    it was sent. A message is written under a name no consumer takes, then renamed, so a
    consumer never reads it half-written.
    """

    _last_stamp = 0

    @classmethod
    def _stamp(cls) -> int:
        """The monotonic clock in nanoseconds, later than any stamp given before."""
        cls._last_stamp = max(time.monotonic_ns(), cls._last_stamp + 1)
        return cls._last_stamp

    # Kombu names the message ``message`` in its base channel, ``payload`` here.
    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        rank = 0 if self._get_message_priority(message) <= RESENT_PRIORITY else 1
        name = f"{rank}_{self._stamp():020d}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        part = folder / f".{name}.part"
        part.write_bytes(dumps(message).encode())
        os.replace(part, folder / name)


class FolderTransport(filesystem.Transport):
    """The embedded mode's transport: kombu's filesystem transport with
    :class:`FolderChannel`."""

    Channel = FolderChannel


class Ledger(Protocol):
    """What a worker's reconciliation needs to know of the broker."""

    def renew(self, delivery_tags: Iterable[str]) -> int: ...

    def held_job_ids(self, queues: Iterable[str]) -> set[str]: ...

    def try_lock(self, name: str, seconds: float) -> bool: ...


class BrokerLedger:
    """What the Redis broker holds for the job queues, read and renewed directly.

    Args:
        url: the Redis broker URL.
        timeout_s: socket timeout of every call.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def renew(self, delivery_tags: Iterable[str]) -> int:
        """Renews the leases of messages this worker holds (only those still handed
        out: a lease that already expired is not revived). Returns how many."""
        tags = list(delivery_tags)
        if not tags:
            return 0
        now = time.time()
        return int(
            self.client.zadd(UNACKED_INDEX_KEY, dict.fromkeys(tags, now), xx=True, ch=True) or 0
        )

    def held_job_ids(self, queues: Iterable[str]) -> set[str]:
        """Ids of the jobs that have a message waiting in ``queues`` or handed out."""
        messages: list[Any] = []
        for queue in queues:
            for suffix in _PRIORITY_SUFFIXES:
                messages.extend(_json(m) for m in self.client.lrange(queue + suffix, 0, -1))
        for value in self.client.hvals(UNACKED_KEY):  # [message, exchange, routing key]
            entry = _json(value)
            messages.append(entry[0] if isinstance(entry, list) and entry else None)
        return {task_id for m in messages if (task_id := _task_id(m)) is not None}

    def try_lock(self, name: str, seconds: float) -> bool:
        """Takes the named lock for ``seconds`` unless another holder has it."""
        return bool(self.client.set(name, b"1", nx=True, px=max(1, int(seconds * 1000))))

    def close(self) -> None:
        self.client.close()


class FolderLedger:
    """What the embedded mode's filesystem transport holds: the messages waiting in its
    folder. A message a worker has taken is gone from there (the transport keeps no record
    of handed-out messages, nor leases to renew), so a job whose worker died with its
    message is found by its record alone.

    Args:
        folder: the transport's folder (:func:`broker_folder`).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def renew(self, delivery_tags: Iterable[str]) -> int:
        return 0  # nothing to renew: a taken message is the taker's for good

    def held_job_ids(self, queues: Iterable[str]) -> set[str]:
        """Ids of the jobs that have a message waiting in ``queues``."""
        names = {f"{queue}.msg" for queue in queues}
        found = set()
        for path in (self.folder / "queue").glob("*.msg"):
            if path.name.partition(".")[2] not in names:
                continue
            try:
                message = _json(path.read_bytes())
            except OSError:  # taken meanwhile
                continue
            if (task_id := _task_id(message)) is not None:
                found.add(task_id)
        return found

    def try_lock(self, name: str, seconds: float) -> bool:
        """Takes the named lock for ``seconds`` unless another process has it (a file
        that holds its expiry, read and written under ``flock``)."""
        with open(self.folder / f"{name}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            try:
                until = float(f.read() or 0)
            except ValueError:
                until = 0.0
            now = time.time()
            if now < until:
                return False
            f.seek(0)
            f.truncate()
            f.write(repr(now + seconds))
            return True

    def close(self) -> None:
        pass


def _json(raw: Any) -> Any:
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


def _task_id(message: Any) -> str | None:
    """The task id of a kombu message (Celery protocol 2 keeps it in the headers)."""
    headers = message.get("headers") if isinstance(message, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None
