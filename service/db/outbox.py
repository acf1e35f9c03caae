"""The job store's operations on the outbox of deliveries
(:data:`service.db.tables.deliveries`): webhook events and DICOMweb stores of a job's
results, waiting to be made or made. :class:`DeliveryRecords` is a part of
:class:`service.db.store.JobStore`, and the store's state changes record the deliveries
they cause with :func:`insert_delivery`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.db.records import Delivery, DeliveryStatus, NewDelivery, utcnow
from service.db.tables import deliveries, jobs


def insert_delivery(conn: Connection, event: NewDelivery, now: datetime) -> None:
    """Records ``event``, due now, in the transaction of ``conn``."""
    conn.execute(
        deliveries.insert().values(
            **asdict(event),
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


class DeliveryRecords:
    """Reads, claims and ends deliveries; each method is one short transaction, in the
    store's :meth:`_tx` and :meth:`_read`."""

    def _tx(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

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
