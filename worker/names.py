"""Names shared by the API and the workers, importable without building the Celery app."""

TASK_SEGMENT = "omnet.segment"
