"""The Alembic revisions of the job database, oldest first by their numbers; each names
the one before it (``down_revision``).
"""
