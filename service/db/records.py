"""What the job database holds, as Python values: the states of a job and of a delivery,
and the records read from it (:class:`Job`, :class:`Delivery`) or written to it
(:class:`NewDelivery`), with :func:`utcnow`, the clock every stored time is read from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa


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
    #: The fingerprint of the submission (see :mod:`service.idempotency`); None for jobs
    #: created before it was recorded.
    submission_sha256: str | None = None

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
