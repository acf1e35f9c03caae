"""Add jobs.submission_sha256: the fingerprint of the submission that made a job.

A SHA-256 over the job's options and the content of its uploaded files, so that a POST
retried with the job's Idempotency-Key can be told from a different submission sent
with the same key. Jobs created before this revision have none (NULL), and a retry of
theirs is answered with the job, as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_submission_sha256"
down_revision = "0002_deliveries_table"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("submission_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    # SQLite drops a column only by copying the table, which batch mode does.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("submission_sha256")
