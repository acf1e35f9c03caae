"""The deployment's measured pace, read from the job store, and the wait it predicts for
a queued job.

:func:`read_pace` reads, in one bounded statement, the run times (``started_at`` to
``finished_at``) of the latest succeeded jobs, the running jobs whose workers are alive,
and the live workers. :meth:`Pace.eta_s` turns that into the seconds a queued job has
left: the jobs ahead of it and it itself each take the median run time, one per worker
slot, the slots freeing as the running jobs finish.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.db.records import JobState, utcnow
from service.db.tables import jobs, workers

#: Succeeded jobs whose run times give the median run time (the latest finished).
RECENT_RUNS = 50
#: Most running jobs and live workers read (a bound on the statement's rows).
MAX_ROWS = 1000
#: Progress from which a running job's own rate gives its time left.
ETA_FROM_PROGRESS = 0.1


def progress_left_s(elapsed_s: float, progress: float) -> float | None:
    """Seconds a running job has left at its rate so far (elapsed x left / done); None
    before :data:`ETA_FROM_PROGRESS` or once done."""
    if not ETA_FROM_PROGRESS <= progress < 1.0:
        return None
    return max(0.0, elapsed_s * (1.0 - progress) / progress)


@dataclass(frozen=True)
class Pace:
    """What the job store says of the deployment's pace at one moment."""

    #: Run times of the latest succeeded jobs, seconds (at most :data:`RECENT_RUNS`).
    run_times_s: tuple[float, ...]
    #: Each running job with a live worker: (seconds since it started, progress).
    running: tuple[tuple[float, float], ...]
    #: Workers seen within the liveness interval.
    workers: int

    @property
    def run_time_s(self) -> float | None:
        """Median run time of the recent succeeded jobs; None before any."""
        return statistics.median(self.run_times_s) if self.run_times_s else None

    @property
    def slots(self) -> int:
        """Jobs the deployment runs at a time: its live workers, or more when more jobs
        run (a prefork worker registers once and runs up to its concurrency)."""
        return max(self.workers, len(self.running))

    def left_s(self, elapsed_s: float, progress: float) -> float:
        """Seconds a running job has left: from its own rate once it has one, else the
        median run time less the time it has run (at least 0)."""
        own = progress_left_s(elapsed_s, progress)
        if own is not None:
            return own
        return max(0.0, (self.run_time_s or 0.0) - elapsed_s)

    def eta_s(self, position: int) -> float | None:
        """Seconds until the queued job at ``position`` (1: next) finishes: the jobs ahead
        of it start one per free slot, in order, each taking the median run time. None
        without a measured run, a live worker or a position."""
        run_s = self.run_time_s
        if run_s is None or self.slots == 0 or position < 1:
            return None
        free = sorted(self.left_s(e, p) for e, p in self.running)
        free += [0.0] * (self.slots - len(free))
        heapq.heapify(free)
        for _ in range(position - 1):  # the jobs ahead, each on the first slot free
            heapq.heapreplace(free, free[0] + run_s)
        return round(free[0] + run_s, 1)


def read_pace(
    conn: Connection, live_within_s: float, stale_after_s: float, now: datetime | None = None
) -> Pace:
    """The :class:`Pace` of the deployment, in one statement on ``conn``: the run times
    of the latest :data:`RECENT_RUNS` succeeded jobs, the running jobs whose heartbeat is
    younger than ``stale_after_s`` and the workers seen within ``live_within_s``."""
    now = now or utcnow()
    runs = (
        sa.select(
            sa.literal("run").label("kind"),
            jobs.c.started_at.label("at"),
            jobs.c.finished_at.label("until"),
            sa.cast(sa.null(), sa.Float).label("progress"),
        )
        .where(
            jobs.c.state == JobState.SUCCEEDED,
            jobs.c.started_at.is_not(None),
            jobs.c.finished_at.is_not(None),
        )
        .order_by(jobs.c.finished_at.desc())
        .limit(RECENT_RUNS)
    )
    running = (
        sa.select(sa.literal("running"), jobs.c.started_at, jobs.c.heartbeat_at, jobs.c.progress)
        .where(
            jobs.c.state == JobState.RUNNING,
            jobs.c.started_at.is_not(None),
            jobs.c.heartbeat_at >= now - timedelta(seconds=stale_after_s),
        )
        .limit(MAX_ROWS)
    )
    live = (
        sa.select(
            sa.literal("worker"), workers.c.seen_at, workers.c.seen_at, sa.cast(sa.null(), sa.Float)
        )
        .where(workers.c.seen_at >= now - timedelta(seconds=live_within_s))
        .limit(MAX_ROWS)
    )
    # Each part in a subquery of its own: SQLite takes ORDER BY and LIMIT only there.
    parts = [sa.select(q.subquery()) for q in (runs, running, live)]
    union = sa.union_all(*parts).subquery()
    rows = conn.execute(sa.select(union)).all()
    run_times, active, count = [], [], 0
    for name, at, until, progress in rows:
        if name == "run":
            run_times.append(max(0.0, (until - at).total_seconds()))
        elif name == "running":
            active.append((max(0.0, (now - at).total_seconds()), float(progress or 0.0)))
        else:
            count += 1
    return Pace(tuple(run_times), tuple(active), count)
