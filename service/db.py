"""Job records, worker registrations and deliveries (webhook events, DICOMweb stores),
shared by every API process and worker.

SQLAlchemy Core over SQLite by default (a file in the shared storage folder, WAL mode)
or any other database URL (PostgreSQL in a larger deployment). Every state change is
one conditional UPDATE, so several API processes and workers can share the records
without locks of their own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

logger = logging.getLogger(__name__)


class JobState(StrEnum):
    """The state of a job record; the values are what the database and the API hold."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States from which a job can still run (and be cancelled).
ACTIVE = (JobState.QUEUED, JobState.RUNNING)
#: Final states: nothing changes a finished job any more.
FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class DeliveryStatus(StrEnum):
    """Where a webhook event's delivery stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False, index=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("stage", sa.String(32), nullable=True),
    sa.Column("options", sa.Text, nullable=False),
    sa.Column("inputs", sa.Text, nullable=False),
    sa.Column("queue", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False, index=True),
    sa.Column("started_at", sa.DateTime, nullable=True),
    sa.Column("finished_at", sa.DateTime, nullable=True),
    sa.Column("heartbeat_at", sa.DateTime, nullable=True),
    sa.Column("expires_at", sa.DateTime, nullable=True, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker", sa.String(200), nullable=True),
    sa.Column("model_name", sa.String(200), nullable=True),
    sa.Column("model_sha256", sa.String(64), nullable=True),
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.UniqueConstraint("owner", "idempotency_key", name="uq_owner_idempotency"),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("device", sa.String(32), nullable=False),
    sa.Column("queue", sa.String(64), nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("seen_at", sa.DateTime, nullable=False),
)

#: Deliveries waiting to be made, or made (an outbox): one row per webhook event of a job
#: or per DICOMweb destination its results go to, written in the same transaction as the
#: state change that caused it. ``event`` tells them apart (``job.*``: a webhook event to
#: ``url``; ``dicomweb.store:<name>``: the files listed in ``body`` to destination
#: ``<name>``, whose URL stays in the settings).
deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the webhook-id header
    sa.Column("job_id", sa.String(36), nullable=False, index=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # sent byte for byte on every attempt
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.DateTime, nullable=True, index=True),
    sa.Column("claim", sa.String(64), nullable=True),  # the sender's token while it sends
    sa.Column("claimed_until", sa.DateTime, nullable=True),
    sa.Column("last_status_code", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("last_attempt_at", sa.DateTime, nullable=True),
    sa.Column("finished_at", sa.DateTime, nullable=True),
    sa.UniqueConstraint("job_id", "event", name="uq_delivery_job_event"),
)


def utcnow() -> datetime:
    """Naive UTC now (SQLite keeps no time zones; every stored time is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class Job:
    """One job record."""

    id: str
    owner: str
    state: JobState
    created_at: datetime
    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    progress: float = 0.0
    stage: str | None = None
    queue: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    expires_at: datetime | None = None
    attempts: int = 0
    worker: str | None = None
    model_name: str | None = None
    model_sha256: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: sa.Row) -> Job:
        data = dict(row._mapping)
        data["state"] = JobState(data["state"])
        data["options"] = json.loads(data["options"])
        data["inputs"] = json.loads(data["inputs"])
        data["result"] = json.loads(data["result"]) if data["result"] else None
        return cls(**data)


@dataclass(frozen=True)
class NewDelivery:
    """A webhook event to record with the state change that causes it."""

    id: str
    job_id: str
    owner: str
    event: str
    url: str
    body: str


@dataclass
class Delivery:
    """One webhook event and how its delivery went."""

    id: str
    job_id: str
    owner: str
    event: str
    url: str
    body: str
    status: DeliveryStatus
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = None
    claim: str | None = None
    claimed_until: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    last_attempt_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_row(cls, row: sa.Row) -> Delivery:
        data = dict(row._mapping)
        data["status"] = DeliveryStatus(data["status"])
        return cls(**data)


@dataclass(frozen=True)
class AttemptResult:
    """What one delivery attempt (a webhook POST, a DICOMweb store) came to."""

    delivered: bool
    status_code: int | None = None
    error: str | None = None
    #: False when another attempt cannot help (a refused target, no secret).
    retry: bool = True
    #: The receiver's Retry-After, in seconds.
    retry_after_s: float | None = None


def _insert_delivery(conn: Connection, event: NewDelivery, now: datetime) -> None:
    conn.execute(
        deliveries.insert().values(
            **asdict(event),
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


def _claimable(now: datetime, stale_after_s: float) -> sa.ColumnElement[bool]:
    """Jobs a worker may claim: queued, or running under a worker silent for
    ``stale_after_s``."""
    stale = now - timedelta(seconds=stale_after_s)
    return sa.or_(
        jobs.c.state == JobState.QUEUED,
        sa.and_(jobs.c.state == JobState.RUNNING, jobs.c.heartbeat_at < stale),
    )


#: Default of ``OMNET_DATABASE_TIMEOUT_S``: how long any wait for the job database lasts.
DATABASE_TIMEOUT_S = 10.0


def make_engine(url: str, timeout_s: float = DATABASE_TIMEOUT_S) -> Engine:
    """An engine whose every wait for the database gives up after ``timeout_s``.

    SQLite: the wait for another process's write lock. A database server (PostgreSQL):
    the wait for a free pooled connection, connecting, and each use of a connection (the
    check that a pooled one still answers, the statements, the commit): the server
    cancels a statement, and ends a transaction left idle, after ``timeout_s``
    (``statement_timeout``, ``idle_in_transaction_session_timeout``), and
    :class:`Deadlines` cuts a connection whose server sends nothing back (a hung server,
    or a proxy or network that holds the packets: a TCP connection that stays open, which
    no server-side timeout or keepalive ends). A call that gives up raises
    ``sqlalchemy.exc.OperationalError`` (``TimeoutError`` for the pool), which the API
    answers with 503.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"timeout": timeout_s, "check_same_thread": False}
        )

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            cur.close()

        return engine
    if sa.engine.make_url(url).get_backend_name() != "postgresql":
        return sa.create_engine(url, pool_pre_ping=True, pool_timeout=timeout_s)
    ms = max(1, int(timeout_s * 1000))
    engine = sa.create_engine(
        url,
        pool_timeout=timeout_s,
        connect_args={
            "connect_timeout": max(1, math.ceil(timeout_s)),
            "options": f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}",
        },
    )
    deadlines = Deadlines(timeout_s)

    @sa.event.listens_for(engine, "connect")
    def _fresh(_dbapi_conn: Any, record: Any) -> None:
        record.info["fresh"] = True

    @sa.event.listens_for(engine, "checkout")
    def _lease(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        # The pool's own pre-ping has no deadline; this one runs under the lease's.
        deadlines.arm(dbapi_conn)
        if record.info.pop("fresh", False):
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # closed by the server, or cut: try a new connection
            deadlines.disarm(dbapi_conn)
            raise sa.exc.DisconnectionError(f"the pooled connection did not answer: {exc}") from exc

    @sa.event.listens_for(engine, "checkin")
    def _returned(dbapi_conn: Any, _record: Any) -> None:
        if dbapi_conn is not None:
            deadlines.disarm(dbapi_conn)

    return engine


class Deadlines:
    """Cuts the database connections whose use outlasts ``seconds``.

    A connection is armed when the pool hands it out and disarmed when it comes back. One
    thread watches the deadlines; at one, it shuts the connection's socket down, so that
    the call blocked on it fails at once (the driver reads the end of the stream) and the
    pool discards the connection. The thread ends when nothing is armed for a while and
    starts again with the next connection.
    """

    #: The watching thread ends after this long with nothing armed.
    IDLE_S = 30.0

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._reset()
        ref = weakref.ref(self)  # the fork hook must not keep the engine's watch alive
        os.register_at_fork(after_in_child=lambda: _reset_deadlines(ref))

    def _reset(self) -> None:
        # Also in a forked child: the parent's thread is gone and its lock may be held.
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Any]] = {}  # id(connection) -> deadline, it
        self._thread: threading.Thread | None = None

    def arm(self, dbapi_conn: Any) -> None:
        with self._cond:
            self._armed[id(dbapi_conn)] = (time.monotonic() + self.seconds, dbapi_conn)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._watch, name="database-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def disarm(self, dbapi_conn: Any) -> None:
        with self._cond:
            self._armed.pop(id(dbapi_conn), None)

    def _watch(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                now = time.monotonic()
                due = [key for key, (at, _c) in self._armed.items() if at <= now]
                expired = [self._armed.pop(key)[1] for key in due]
                if not expired:
                    if self._armed:
                        idle_since = now
                    elif now - idle_since >= self.IDLE_S:
                        self._thread = None
                        return
                    nearest = min((at for at, _c in self._armed.values()), default=None)
                    wait = self.IDLE_S if nearest is None else nearest - now
                    self._cond.wait(max(0.01, wait))
                    continue
            for dbapi_conn in expired:
                _cut(dbapi_conn)


def _reset_deadlines(ref: weakref.ref[Deadlines]) -> None:
    deadlines = ref()
    if deadlines is not None:
        deadlines._reset()


def _cut(dbapi_conn: Any) -> None:
    """Shuts down the socket of a DBAPI connection (psycopg's ``fileno()``), so that a
    call blocked reading from it returns."""
    try:
        sock = socket.socket(fileno=os.dup(dbapi_conn.fileno()))
    except Exception:  # closed meanwhile
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
        logger.warning("cut a database connection that did not answer in time")
    except OSError:
        pass
    finally:
        sock.close()


#: How long a fork waits for the store's connections in use to be returned.
FORK_WAIT_S = 60.0


class ForkGate:
    """Keeps ``os.fork`` and the store's connections apart.

    A Celery prefork worker forks its pool children from a parent whose threads use the
    store (worker heartbeats, reconciliation, webhook deliveries). A child must not
    inherit a connection: SQLite keeps per-process lock state that a copy corrupts (the
    child's claims then fail with "database is locked"), and a server connection's
    socket cannot be shared. So a fork waits until no connection is in use, holds new
    ones back while it runs, and closes the parent's idle pooled connections; the child
    starts with an empty pool of its own. Enter the gate around every use of the engine.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Condition()
        self._in_use = 0
        self._forking = False
        self._depth = threading.local()  # a thread's nested uses never wait for a fork
        gate = weakref.ref(self)  # the fork hooks must not keep the store alive
        os.register_at_fork(
            before=lambda: _call(gate, "_before_fork"),
            after_in_parent=lambda: _call(gate, "_after_fork_in_parent"),
            after_in_child=lambda: _call(gate, "_after_fork_in_child"),
        )

    def __enter__(self) -> None:
        depth = getattr(self._depth, "n", 0)
        with self._lock:
            if depth == 0:
                self._lock.wait_for(lambda: not self._forking)
            self._in_use += 1
        self._depth.n = depth + 1

    def __exit__(self, *_exc: object) -> None:
        self._depth.n -= 1
        with self._lock:
            self._in_use -= 1
            if self._in_use == 0:
                self._lock.notify_all()

    def _before_fork(self) -> None:
        self._lock.acquire()  # held across the fork: no thread can start using the engine
        self._forking = True  # and none starts while the fork waits for those in use
        # A connection stuck for longer (a hung database server) does not stop the fork;
        # the child still starts with a pool of its own.
        self._lock.wait_for(lambda: self._in_use == 0, timeout=FORK_WAIT_S)
        self._engine.dispose()  # nothing idle and open for the child to inherit

    def _after_fork_in_parent(self) -> None:
        self._forking = False
        self._lock.notify_all()
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        # The parent's other threads are gone, and the lock's copy is held.
        self._lock = threading.Condition()
        self._in_use = 0
        self._forking = False
        self._depth = threading.local()
        self._engine.dispose(close=False)


def _call(ref: weakref.ref[ForkGate], method: str) -> None:
    gate = ref()
    if gate is not None:
        getattr(gate, method)()


#: Tries of :func:`create_schema` when another process creates the same tables meanwhile.
SCHEMA_TRIES = 5


def create_schema(engine: Engine) -> None:
    """Creates the missing tables. Processes that start together on a new database (the
    API and its embedded worker, several API processes) race between "is the table
    there?" and "create it": the loser's CREATE fails with "already exists", and it
    looks again, finding the winner's tables."""
    for attempt in range(SCHEMA_TRIES):
        try:
            metadata.create_all(engine)
            return
        except sa.exc.DBAPIError as exc:
            message = str(exc.orig).lower()
            if attempt == SCHEMA_TRIES - 1 or not ("exist" in message or "duplicate" in message):
                raise
            time.sleep(0.05 * (attempt + 1))


class JobStore:
    """Reads and changes job records; every method is one short transaction."""

    def __init__(self, url: str, timeout_s: float = DATABASE_TIMEOUT_S) -> None:
        self.engine = make_engine(url, timeout_s)
        # A commit whose answer did not come may still reach a server (a proxy or the
        # network held it); the server ends a transaction left idle for timeout_s, so once
        # that has passed since the commit was sent, it can no longer take effect.
        self._commit_fence_s = 0.0 if url.startswith("sqlite") else timeout_s + 1.0
        create_schema(self.engine)
        self._fork_gate = ForkGate(self.engine)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction. When its commit fails without an answer (the connection was
        cut or lost), this waits until the commit can no longer take effect on the
        server before raising, so that a caller told "failed" never sees the change made
        later."""
        with self._fork_gate, self.engine.connect() as conn:
            tx = conn.begin()
            try:
                yield conn
            except BaseException:
                tx.rollback()
                raise
            sent = time.monotonic()
            try:
                tx.commit()
            except sa.exc.DBAPIError as exc:
                if exc.connection_invalidated and self._commit_fence_s:
                    time.sleep(max(0.0, sent + self._commit_fence_s - time.monotonic()))
                raise

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._fork_gate, self.engine.connect() as conn:
            yield conn

    # ---------------------------------------------------------------- jobs
    def create(
        self,
        owner: str,
        options: dict[str, Any],
        inputs: dict[str, str],
        queue: str,
        idempotency_key: str | None = None,
        job_id: str | None = None,
    ) -> tuple[Job, bool]:
        """Inserts a queued job; with an idempotency key already used by ``owner``, returns
        that job instead. Returns (job, created)."""
        job_id = job_id or str(uuid.uuid4())
        now = utcnow()
        try:
            with self._tx() as conn:
                conn.execute(
                    jobs.insert().values(
                        id=job_id,
                        owner=owner,
                        idempotency_key=idempotency_key,
                        state=JobState.QUEUED,
                        progress=0.0,
                        options=json.dumps(options),
                        inputs=json.dumps(inputs),
                        queue=queue,
                        created_at=now,
                        attempts=0,
                    )
                )
        except sa.exc.IntegrityError:
            existing = self.by_idempotency_key(owner, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return existing, False
        job = self.get(job_id)
        assert job is not None  # just inserted
        return job, True

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        with self._read() as conn:
            row = conn.execute(query).first()
        return Job.from_row(row) if row else None

    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        query = sa.select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key)
        with self._read() as conn:
            row = conn.execute(query).first()
        return Job.from_row(row) if row else None

    def list_jobs(self, owner: str, limit: int, offset: int) -> tuple[list[Job], int]:
        """A page of ``owner``'s jobs, newest first, and how many they have in all."""
        query = (
            sa.select(jobs)
            .where(jobs.c.owner == owner)
            .order_by(jobs.c.created_at.desc(), jobs.c.id)
            .limit(limit)
            .offset(offset)
        )
        count = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.owner == owner)
        with self._read() as conn:
            rows = conn.execute(query).all()
            total = conn.execute(count).scalar_one()
        return [Job.from_row(r) for r in rows], int(total)

    def queue_position(self, job: Job) -> int | None:
        """1 + queued jobs created before ``job``; None when it is not queued."""
        if job.state != JobState.QUEUED:
            return None
        query = (
            sa.select(sa.func.count())
            .select_from(jobs)
            .where(jobs.c.state == JobState.QUEUED, jobs.c.created_at < job.created_at)
        )
        with self._read() as conn:
            return int(conn.execute(query).scalar_one()) + 1

    def queue_positions(self, jobs_: Sequence[Job]) -> dict[str, int]:
        """:meth:`queue_position` of each queued job of ``jobs_``, in one statement; job
        id -> position (only queued jobs are in it)."""
        if not jobs_:
            return {}
        queued = sorted(j.id for j in jobs_ if j.state == JobState.QUEUED)
        earlier = jobs.alias("earlier")
        ahead = (
            sa.select(sa.func.count())
            .select_from(earlier)
            .where(earlier.c.state == JobState.QUEUED, earlier.c.created_at < jobs.c.created_at)
            .scalar_subquery()
        )
        query = sa.select(jobs.c.id, ahead).where(jobs.c.id.in_(queued))
        with self._read() as conn:
            return {job_id: int(n) + 1 for job_id, n in conn.execute(query).all()}

    def counts(self) -> dict[JobState, int]:
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        with self._read() as conn:
            found: dict[str, int] = {s: n for s, n in conn.execute(query).all()}
        return {state: int(found.get(state, 0)) for state in JobState}

    def durations(self, limit: int = 1000) -> list[float]:
        """Seconds from creation to finish of the latest succeeded jobs."""
        query = (
            sa.select(jobs.c.created_at, jobs.c.finished_at)
            .where(jobs.c.state == JobState.SUCCEEDED)
            .order_by(jobs.c.finished_at.desc())
            .limit(limit)
        )
        with self._read() as conn:
            return [(f - c).total_seconds() for c, f in conn.execute(query).all()]

    def claim(
        self, job_id: str, worker: str, stale_after_s: float, max_attempts: int | None = None
    ) -> Job | None:
        """Marks the job running for ``worker`` if it is queued, or running under a worker
        silent for ``stale_after_s``, and has been claimed fewer than ``max_attempts``
        times (None: no limit). Returns the job when claimed, else None."""
        now = utcnow()
        claimable = _claimable(now, stale_after_s)
        if max_attempts is not None:
            claimable = sa.and_(claimable, jobs.c.attempts < max_attempts)
        with self._tx() as conn:
            result = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, claimable)
                .values(
                    state=JobState.RUNNING,
                    worker=worker,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=jobs.c.attempts + 1,
                    progress=0.0,
                    stage="starting",
                )
            )
        return self.get(job_id) if result.rowcount == 1 else None

    def fail_exhausted(
        self,
        job_id: str,
        stale_after_s: float,
        max_attempts: int,
        retention: timedelta,
        error_code: str,
        error_message: str,
        event: NewDelivery | None = None,
    ) -> bool:
        """Fails a job that a worker could claim (queued, or running under a worker silent
        for ``stale_after_s``) but that was claimed ``max_attempts`` times already: its
        workers stopped (were killed) that often. ``event``, a webhook event, is recorded
        with the change. False when the job is not such a job (any more)."""
        now = utcnow()
        with self._tx() as conn:
            res = conn.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id,
                    _claimable(now, stale_after_s),
                    jobs.c.attempts >= max_attempts,
                )
                .values(
                    state=JobState.FAILED,
                    finished_at=now,
                    expires_at=now + retention,
                    stage=None,
                    error_code=error_code,
                    error_message=error_message,
                )
            )
            if res.rowcount == 1 and event is not None:
                _insert_delivery(conn, event, now)
        return res.rowcount == 1

    def heartbeat(self, job_id: str, worker: str, progress: float, stage: str) -> Job | None:
        """Records progress of a job that ``worker`` runs; returns the record as it is now
        (None if it was deleted), so that the worker can see whether it still holds it."""
        with self._tx() as conn:
            conn.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id, jobs.c.state == JobState.RUNNING, jobs.c.worker == worker
                )
                .values(progress=progress, stage=stage, heartbeat_at=utcnow())
            )
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return Job.from_row(row) if row else None

    def finish(
        self,
        job_id: str,
        worker: str,
        state: JobState,
        retention: timedelta,
        result: dict[str, Any] | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        model_name: str | None = None,
        model_sha256: str | None = None,
        event: NewDelivery | None = None,
        deliveries: Sequence[NewDelivery] = (),
    ) -> bool:
        """Moves a job this worker runs to a final state; False if it is no longer its job.
        ``event``, a webhook event, and ``deliveries`` (results to store elsewhere) are
        recorded with the change (and only with it)."""
        now = utcnow()
        with self._tx() as conn:
            res = conn.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id, jobs.c.state == JobState.RUNNING, jobs.c.worker == worker
                )
                .values(
                    state=state,
                    finished_at=now,
                    expires_at=now + retention,
                    progress=1.0 if state == JobState.SUCCEEDED else jobs.c.progress,
                    stage=None,
                    result=json.dumps(result) if result is not None else None,
                    error_code=error_code,
                    error_message=error_message,
                    model_name=model_name,
                    model_sha256=model_sha256,
                )
            )
            if res.rowcount == 1:
                for new in (*deliveries, *([event] if event is not None else [])):
                    _insert_delivery(conn, new, now)
        return res.rowcount == 1

    def cancel(
        self, job_id: str, owner: str, retention: timedelta, event: NewDelivery | None = None
    ) -> Job | None:
        """Cancels a queued or running job of ``owner``; returns the job after the change.
        ``event``, a webhook event, is recorded if this call cancelled it."""
        now = utcnow()
        with self._tx() as conn:
            res = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.owner == owner, jobs.c.state.in_(ACTIVE))
                .values(
                    state=JobState.CANCELLED,
                    finished_at=now,
                    expires_at=now + retention,
                    stage=None,
                )
            )
            if res.rowcount == 1 and event is not None:
                _insert_delivery(conn, event, now)
        return self.get(job_id, owner)

    def delete(self, job_id: str) -> None:
        """Deletes the job's record and its finished webhook deliveries (a pending one is
        still sent, then removed: see :meth:`end_delivery`)."""
        with self._tx() as conn:
            conn.execute(jobs.delete().where(jobs.c.id == job_id))
            conn.execute(
                deliveries.delete().where(
                    deliveries.c.job_id == job_id, deliveries.c.status != DeliveryStatus.PENDING
                )
            )

    def expired(self, now: datetime | None = None) -> list[str]:
        query = sa.select(jobs.c.id).where(jobs.c.expires_at < (now or utcnow()))
        with self._read() as conn:
            return [r.id for r in conn.execute(query).all()]

    def orphans(self, stale_after_s: float) -> list[Job]:
        """Queued jobs, and running jobs whose worker went silent: candidates to re-send."""
        query = sa.select(jobs).where(_claimable(utcnow(), stale_after_s))
        with self._read() as conn:
            return [Job.from_row(r) for r in conn.execute(query).all()]

    # ---------------------------------------------------------------- webhooks
    def deliveries(self, job_id: str) -> list[Delivery]:
        """The webhook events of a job, oldest first."""
        query = (
            sa.select(deliveries)
            .where(deliveries.c.job_id == job_id)
            .order_by(deliveries.c.created_at, deliveries.c.id)
        )
        with self._read() as conn:
            return [Delivery.from_row(r) for r in conn.execute(query).all()]

    def deliveries_of(self, job_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        """The webhook events of several jobs, oldest first, in one statement; job id ->
        its deliveries (jobs without any are left out)."""
        if not job_ids:
            return {}
        query = (
            sa.select(deliveries)
            .where(deliveries.c.job_id.in_(list(job_ids)))
            .order_by(deliveries.c.created_at, deliveries.c.id)
        )
        out: dict[str, list[Delivery]] = {}
        with self._read() as conn:
            for row in conn.execute(query).all():
                out.setdefault(row.job_id, []).append(Delivery.from_row(row))
        return out

    def retry_deliveries(self, job_id: str, event_prefix: str) -> int:
        """Makes the failed deliveries of ``job_id`` whose event starts with
        ``event_prefix`` pending again, due now, with a fresh count of attempts; returns
        how many."""
        now = utcnow()
        with self._tx() as conn:
            res = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.job_id == job_id,
                    deliveries.c.status == DeliveryStatus.FAILED,
                    deliveries.c.event.startswith(event_prefix, autoescape=True),
                )
                .values(
                    status=DeliveryStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    finished_at=None,
                )
            )
        return int(res.rowcount)

    def claim_deliveries(self, limit: int, lease_s: float) -> list[Delivery]:
        """Claims up to ``limit`` pending deliveries that are due and that no live sender
        holds, for ``lease_s`` seconds, each counting one more attempt. Each claim is a
        conditional UPDATE, so two senders never hold (and send) the same attempt; the
        returned deliveries carry their claim tokens."""
        now = utcnow()
        due = sa.and_(
            deliveries.c.status == DeliveryStatus.PENDING,
            deliveries.c.next_attempt_at <= now,
            sa.or_(deliveries.c.claimed_until.is_(None), deliveries.c.claimed_until < now),
        )
        query = sa.select(deliveries.c.id).where(due).order_by(deliveries.c.next_attempt_at)
        with self._read() as conn:
            candidates = [r.id for r in conn.execute(query.limit(limit)).all()]
        claimed = []
        for delivery_id in candidates:
            token = uuid.uuid4().hex
            with self._tx() as conn:
                res = conn.execute(
                    deliveries.update()
                    .where(deliveries.c.id == delivery_id, due)
                    .values(
                        claim=token,
                        claimed_until=now + timedelta(seconds=lease_s),
                        attempts=deliveries.c.attempts + 1,
                        last_attempt_at=now,
                    )
                )
                if res.rowcount == 1:
                    row = conn.execute(
                        sa.select(deliveries).where(deliveries.c.id == delivery_id)
                    ).one()
                    claimed.append(Delivery.from_row(row))
        return claimed

    def end_delivery(
        self,
        delivery: Delivery,
        status: DeliveryStatus,
        status_code: int | None,
        error: str | None,
        retry_at: datetime | None = None,
    ) -> bool:
        """Records the outcome of the attempt that ``delivery`` (as claimed) made:
        ``status`` pending with ``retry_at`` for another attempt, or delivered or failed.
        A finished delivery whose job record is gone is deleted. False when the claim was
        lost (it expired and another sender took the delivery)."""
        now = utcnow()
        final = status != DeliveryStatus.PENDING
        with self._tx() as conn:
            res = conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery.id, deliveries.c.claim == delivery.claim)
                .values(
                    status=status,
                    claim=None,
                    claimed_until=None,
                    next_attempt_at=None if final else retry_at,
                    finished_at=now if final else None,
                    last_status_code=status_code,
                    last_error=error,
                )
            )
            if res.rowcount == 1 and final:
                job = conn.execute(sa.select(jobs.c.id).where(jobs.c.id == delivery.job_id))
                if job.first() is None:
                    conn.execute(deliveries.delete().where(deliveries.c.id == delivery.id))
        return res.rowcount == 1

    # ---------------------------------------------------------------- workers
    def register_worker(self, name: str, device: str, queue: str, model: dict[str, Any]) -> None:
        now = utcnow()
        values = dict(device=device, queue=queue, model=json.dumps(model), seen_at=now)
        with self._tx() as conn:
            updated = conn.execute(workers.update().where(workers.c.name == name).values(**values))
            if updated.rowcount == 0:
                conn.execute(workers.insert().values(name=name, started_at=now, **values))

    def worker_seen(self, name: str) -> None:
        with self._tx() as conn:
            conn.execute(workers.update().where(workers.c.name == name).values(seen_at=utcnow()))

    def remove_worker(self, name: str) -> None:
        with self._tx() as conn:
            conn.execute(workers.delete().where(workers.c.name == name))

    def live_workers(self, within_s: float) -> list[dict[str, Any]]:
        since = utcnow() - timedelta(seconds=within_s)
        query = sa.select(workers).where(workers.c.seen_at >= since).order_by(workers.c.name)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [{**dict(r._mapping), "model": json.loads(r.model)} for r in rows]

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(sa.text("SELECT 1"))
