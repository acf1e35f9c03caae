"""Idempotency-Key: a retried submission gets the job that its first attempt made; the
same key sent with a different submission is refused.

A submission's fingerprint is a SHA-256 over its options, as parsed (defaults filled
in, so ``preview=true`` and no ``preview`` field are one submission), and the SHA-256 of
each uploaded file, taken while the file is copied into staging (:func:`receive_case
<service.uploads.receive_case>`), so no file is read twice for it. It is recorded with
the job (``jobs.submission_sha256``); jobs recorded before it was have none, and any
submission with their key gets them, as it did then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from service.db import Job
from service.errors import ApiError


def submission_sha256(options: Mapping[str, Any], files: Mapping[str, str]) -> str:
    """The fingerprint of a submission: its parsed ``options`` and the SHA-256 of each
    of its ``files`` by field name."""
    document = json.dumps(
        {"options": dict(options), "files": dict(files)}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(document.encode()).hexdigest()


def answer_retry(job: Job, sha256: str) -> Job:
    """``job``, made earlier with the same Idempotency-Key, as the answer to a
    submission whose fingerprint is ``sha256``: when it is the same submission (or the
    job has no fingerprint recorded). Another submission is refused, 422
    ``idempotency_key_reused``."""
    if job.submission_sha256 is None or job.submission_sha256 == sha256:
        return job
    raise ApiError(
        422,
        "idempotency_key_reused",
        f"this Idempotency-Key was used for job {job.id}, which was submitted with other "
        "files or options; nothing was queued. Send a new submission with a new "
        "Idempotency-Key (one per submission); to get that job, send the same files and "
        "options as then, or GET its status",
    )
