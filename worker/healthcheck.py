"""``python -m worker.healthcheck``: exit 0 when this host's Celery worker answers a ping
within 10 s (the container health check)."""

from __future__ import annotations

import socket
import sys

from service.config import Settings
from service.queue import make_celery


def main() -> int:
    app = make_celery(Settings())
    replies = app.control.ping(destination=[f"celery@{socket.gethostname()}"], timeout=10)
    return 0 if replies else 1


if __name__ == "__main__":
    sys.exit(main())
