"""The job store: :class:`JobStore`, whose every method is one short transaction on the
job records, the worker registrations or (:class:`~service.db.outbox.DeliveryRecords`)
the deliveries. Every state change is one conditional UPDATE, so several API processes
and workers share the records without locks of their own.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

# Imported whole before any thread builds a statement. SQLAlchemy resolves a value of a
# type it has no mapping for (JobState, a StrEnum) through an inspection hook that
# sqlalchemy.orm registers while it is being imported, so a thread comparing a column
# with one, while another thread imports sqlalchemy.orm (Celery's database result
# backend does, as the API sends its first job in embedded mode), fails on the
# half-imported module.
import sqlalchemy.orm
from sqlalchemy.engine import Connection

from service.db.engine import DATABASE_TIMEOUT_S, ForkGate, make_engine
from service.db.outbox import DeliveryRecords, insert_delivery
from service.db.rates import Pace, read_pace
from service.db.records import ACTIVE, DeliveryStatus, Job, JobState, NewDelivery, utcnow
from service.db.schema import create_schema
from service.db.tables import deliveries, jobs, workers


def _claimable(now: datetime, stale_after_s: float) -> sa.ColumnElement[bool]:
    """Jobs a worker may claim: queued, or running under a worker silent for
    ``stale_after_s``."""
    stale = now - timedelta(seconds=stale_after_s)
    return sa.or_(
        jobs.c.state == JobState.QUEUED,
        sa.and_(jobs.c.state == JobState.RUNNING, jobs.c.heartbeat_at < stale),
    )


class JobStore(DeliveryRecords):
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
        submission_sha256: str | None = None,
    ) -> tuple[Job, bool]:
        """Inserts a queued job, with the fingerprint of the submission that made it;
        with an idempotency key already used by ``owner``, returns that job instead.
        Returns (job, created)."""
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
                        submission_sha256=submission_sha256,
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

    def pace(self, live_within_s: float, stale_after_s: float) -> Pace:
        """The deployment's measured pace (:func:`service.db.rates.read_pace`): recent run
        times, running jobs and live workers, in one statement."""
        with self._read() as conn:
            return read_pace(conn, live_within_s, stale_after_s)

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
                insert_delivery(conn, event, now)
        return res.rowcount == 1

    def release(self, worker: str, job_id: str | None = None) -> list[Job]:
        """Queues again the jobs running under ``worker`` (only ``job_id`` when given), a
        process known to be dead, so that a worker may claim them now rather than once
        their heartbeat is stale. Their attempts stay counted; ``worker`` and
        ``started_at`` keep naming the last attempt. Returns the jobs released, as they
        are now."""
        held = sa.and_(jobs.c.state == JobState.RUNNING, jobs.c.worker == worker)
        if job_id is not None:
            held = sa.and_(held, jobs.c.id == job_id)
        with self._tx() as conn:
            ids = [row.id for row in conn.execute(sa.select(jobs.c.id).where(held))]
            released = [
                i
                for i in ids
                if conn.execute(
                    jobs.update()
                    .where(jobs.c.id == i, held)
                    .values(state=JobState.QUEUED, progress=0.0, stage=None)
                ).rowcount
                == 1
            ]
            rows = conn.execute(sa.select(jobs).where(jobs.c.id.in_(released))).all()
        return [Job.from_row(r) for r in rows]

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
                    insert_delivery(conn, new, now)
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
                insert_delivery(conn, event, now)
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
