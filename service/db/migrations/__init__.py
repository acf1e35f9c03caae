"""The job database's migrations: Alembic revisions (``versions/``) and the environment that
runs them (``env.py``), shipped with the package; :mod:`service.db.schema` applies them.
"""
