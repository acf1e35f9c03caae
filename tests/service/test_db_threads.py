"""Threads building job-store statements while another thread imports sqlalchemy.orm
(Celery's database result backend does, as the API sends its first job in embedded
mode): none of them may fail on the half-imported module.

Each try is a fresh interpreter, where nothing has imported sqlalchemy.orm yet.
"""

from __future__ import annotations

import subprocess

from tests.service.support import PYTHON

SCRIPT = """
import threading
import sqlalchemy as sa
from service.db import JobState, jobs

errors, stop = [], threading.Event()

def build():
    while not stop.is_set():
        try:
            sa.select(jobs).where(jobs.c.state == JobState.QUEUED)
        except Exception as exc:
            errors.append(repr(exc))
            return

threads = [threading.Thread(target=build) for _ in range(4)]
for thread in threads:
    thread.start()
import celery.backends.database  # imports sqlalchemy.orm
stop.set()
for thread in threads:
    thread.join()
print(errors[:1])
"""


def test_statements_built_while_sqlalchemy_orm_is_imported_do_not_fail():
    for _ in range(3):
        done = subprocess.run([PYTHON, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "[]", done.stdout
