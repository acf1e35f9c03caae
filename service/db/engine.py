"""The connection to the job database: :func:`make_engine`, whose every wait for the
database has a deadline (:class:`Deadlines` cuts a server connection that stops
answering), and :class:`ForkGate`, which keeps ``os.fork`` and the connections in use
apart.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sqlite3
import threading
import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)


#: Default of ``OMNET_DATABASE_TIMEOUT_S``: how long any wait for the job database lasts.
DATABASE_TIMEOUT_S = 10.0


def _write_ahead_log(cur: Any, timeout_s: float) -> None:
    """Puts a SQLite database in write-ahead-log mode (it stays so, in the file). SQLite
    answers "database is locked" at once, without its busy wait, to a process that asks
    while another holds a lock, as processes opening a new database together do: ask
    again until ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


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
            cur.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            _write_ahead_log(cur, timeout_s)
            cur.execute("PRAGMA synchronous=NORMAL")
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

    # First of the connect listeners: SQLAlchemy's own, which follow, send the first
    # statements of a new connection (the dialect's checks), and a server that accepted
    # the connection may never answer them. Checking the connection out arms it afresh.
    @sa.event.listens_for(engine, "connect", insert=True)
    def _fresh(dbapi_conn: Any, record: Any) -> None:
        deadlines.arm(dbapi_conn)
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
