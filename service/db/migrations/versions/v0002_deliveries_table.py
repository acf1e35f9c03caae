"""Rename the outbox table webhook_deliveries to deliveries.

It holds DICOMweb stores as well as webhook events. Its indexes (and, on PostgreSQL,
its primary key) take the names that the new table name gives them.
"""

from __future__ import annotations

from alembic import op

revision = "0002_deliveries_table"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

#: The indexed columns of the table.
INDEXED = ("job_id", "status", "next_attempt_at")


def _rename(old: str, new: str) -> None:
    op.rename_table(old, new)
    if op.get_bind().dialect.name == "postgresql":
        # Renaming keeps the index in place; nothing is rebuilt.
        op.execute(f"ALTER TABLE {new} RENAME CONSTRAINT {old}_pkey TO {new}_pkey")
        for column in INDEXED:
            op.execute(f"ALTER INDEX ix_{old}_{column} RENAME TO ix_{new}_{column}")
        return
    for column in INDEXED:  # SQLite cannot rename an index
        op.drop_index(f"ix_{old}_{column}", table_name=new)
        op.create_index(f"ix_{new}_{column}", new, [column])


def upgrade() -> None:
    _rename("webhook_deliveries", "deliveries")


def downgrade() -> None:
    _rename("deliveries", "webhook_deliveries")
