"""``python -m worker [celery worker options]``: a Celery worker for the settings in the
environment (``omnet worker`` builds this command line).

The OpenMP wait policy (:mod:`service.openmp`) is set before anything imports torch;
the pool's children, forked from this process, inherit it.
"""

from __future__ import annotations

import sys

from service.config import Settings
from service.openmp import prefer_passive_waits
from worker.app import create_worker_app


def main(argv: list[str]) -> None:
    prefer_passive_waits()  # create_worker_app imports the tasks, and with them torch
    create_worker_app(Settings()).worker_main(["worker", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
