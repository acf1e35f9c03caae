"""The tables of the job database as the code reads and writes them: ``jobs``,
``workers`` and ``deliveries``.

They describe the schema at the newest migration (:mod:`service.db.migrations`); a change
to them goes with a new migration that makes it in existing databases (see
:mod:`service.db.schema`).
"""

from __future__ import annotations

import sqlalchemy as sa

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
    # SHA-256 of the options and input files submitted (NULL: a job created before it
    # was recorded); tells a retry with the same Idempotency-Key from another submission.
    sa.Column("submission_sha256", sa.String(64), nullable=True),
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
    "deliveries",
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
