"""``python -m worker [celery worker options]``: a Celery worker for the settings in the
environment (``omnet worker`` builds this command line).

The OpenMP wait policy and, with ``OMNET_THREADS``, the number of inference threads
(:mod:`service.openmp`) are set before anything imports torch; the pool's children,
forked from this process, inherit them.
"""

from __future__ import annotations

import os
import sys
import warnings

from service.config import Settings
from service.openmp import prefer_passive_waits, set_thread_count
from worker.app import create_worker_app


def _root_note() -> None:
    """One line instead of Celery's multi-line SecurityWarning when running as root."""
    from celery.platforms import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        print(
            "omnet worker: running as root; a dedicated user is safer (the Docker images "
            "run as uid 10001)",
            file=sys.stderr,
        )


def main(argv: list[str]) -> None:
    prefer_passive_waits()  # create_worker_app imports the tasks, and with them torch
    settings = Settings()
    set_thread_count(settings.threads)
    _root_note()
    # --quiet: no banner; the worker logs the model and device it loaded, and when ready.
    create_worker_app(settings).worker_main(["--quiet", "worker", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
