"""A running job's heartbeat: progress written to the job's record, and the reasons a
job must stop before it is done (cancelled, taken over by another worker, out of time),
noticed between beats and raised at the job's next check.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

from service.db import FINISHED, JobState, JobStore

logger = logging.getLogger(__name__)


class StopReason(StrEnum):
    """Why a running job must stop before it is done."""

    CANCELLED = "cancelled"
    TAKEN_OVER = "taken_over"
    TIME_LIMIT = "time_limit"


class JobStoppedError(Exception):
    """The job must stop: cancelled, taken over by another worker, or out of time."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason)
        self.reason = reason


#: While a job's progress moves, it is written at most this often (seconds) ...
PROGRESS_S = 2.0
#: ... and only when it moved at least this much since the last write.
PROGRESS_STEP = 0.02


@dataclass
class Progress:
    fraction: float = 0.0
    stage: str = "starting"


class Heartbeat(threading.Thread):
    """Records progress every ``interval`` seconds and watches for a reason to stop."""

    def __init__(
        self, store: JobStore, job_id: str, worker: str, interval: float, deadline: float
    ) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.store, self.job_id, self.worker = store, job_id, worker
        self.interval, self.deadline = interval, deadline
        self.progress = Progress()
        self.stop_reason: StopReason | None = None
        self._done = threading.Event()

    def beat(self) -> None:
        job = self.store.heartbeat(
            self.job_id, self.worker, self.progress.fraction, self.progress.stage
        )
        if job is None or job.state == JobState.CANCELLED:
            self.stop_reason = StopReason.CANCELLED
        elif job.state in FINISHED or job.worker != self.worker:
            self.stop_reason = StopReason.TAKEN_OVER
        elif time.monotonic() > self.deadline:
            self.stop_reason = StopReason.TIME_LIMIT

    def run(self) -> None:
        # A beat every ``interval``, and in between one every PROGRESS_S while the progress
        # moves, so that a job of a minute shows its tiles advancing, not 0 then 0.9.
        last_beat, last_written = time.monotonic(), self.progress.fraction
        while not self._done.wait(min(self.interval, PROGRESS_S)):
            due = time.monotonic() - last_beat >= self.interval
            moved = self.progress.fraction - last_written >= PROGRESS_STEP
            if not (due or moved):
                continue
            last_beat, last_written = time.monotonic(), self.progress.fraction
            try:
                self.beat()
            except Exception:  # a database hiccup must not kill the job; next beat retries
                logger.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def check(self) -> None:
        if self.stop_reason is None and time.monotonic() > self.deadline:
            self.stop_reason = StopReason.TIME_LIMIT
        if self.stop_reason is not None:
            raise JobStoppedError(self.stop_reason)

    def pause(self, seconds: float) -> None:
        """Sleeps ``seconds``, stopping early (JobStoppedError) when the job must stop."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self.check()
            time.sleep(min(left, 0.25))
        self.check()

    def close(self) -> None:
        self._done.set()
