"""``python -m worker [celery worker options]``: a Celery worker for the settings in the
environment (``omnet worker`` builds this command line)."""

from __future__ import annotations

import sys

from service.config import Settings
from worker.app import create_worker_app


def main(argv: list[str]) -> None:
    create_worker_app(Settings()).worker_main(["worker", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
