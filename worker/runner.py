"""Running one segmentation job: claim it, segment, store the results, report progress.

The job record is the single source of truth. A worker first *claims* the job (queued,
or running under a worker silent for ``stale_after_s``); a re-delivered message for a
job that another live worker holds is put back for later, and one for a finished job is
dropped, so every job runs to completion once. While it runs, a heartbeat thread
records progress and notices cancellation (cooperative: the tile loop stops at the
next batch) and the time limit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from model.checkpoint import Checkpoint
from model.labels import ENHANCING
from model.metrics import evaluate_case, region_volumes_ml
from model.nifti_io import (
    MODALITIES,
    InputError,
    load_case,
    load_labels,
)
from model.pipeline import SegmentationOptions, load_predictor, segment_case, write_segmentation
from model.tiling import TILINGS, Predictor
from service.config import Settings
from service.db import CANCELLED, FAILED, FINISHED, RUNNING, SUCCEEDED, JobStore
from service.storage import Storage

logger = logging.getLogger(__name__)


class JobStoppedError(Exception):
    """The job must stop: cancelled, taken over by another worker, or out of time."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_lock = threading.Lock()
_loaded: tuple[Predictor, list[Checkpoint]] | None = None


def default_checkpoints(settings: Settings) -> list[str]:
    from model.weights import bundled_checkpoint

    if settings.checkpoints:
        return [str(p) for p in settings.checkpoints]
    bundled = bundled_checkpoint()
    if bundled is None:
        raise RuntimeError(
            "no model to serve: no bundled model is installed and OMNET_CHECKPOINT is not set"
        )
    return [str(bundled)]


def get_predictor(settings: Settings) -> tuple[Predictor, list[Checkpoint]]:
    """The network(s), loaded once per worker process."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = load_predictor(
                default_checkpoints(settings),
                device=settings.device,
                batch_size=settings.batch_size,
                layout=TILINGS[settings.tiling],
            )
            logger.info("loaded %s on %s", [c.name for c in _loaded[1]], _loaded[0].device)
        return _loaded


def describe_model(checkpoints: list[Checkpoint]) -> dict[str, Any]:
    return {
        "name": "+".join(c.name for c in checkpoints),
        "sha256": checkpoints[0].sha256
        if len(checkpoints) == 1
        else "+".join(c.sha256[:16] for c in checkpoints),
        "checkpoints": [
            {
                "name": c.name,
                "sha256": c.sha256,
                "variant": c.config.variant,
                "width": c.config.width,
                "metadata": c.metadata,
            }
            for c in checkpoints
        ],
    }


@dataclass
class _Progress:
    fraction: float = 0.0
    stage: str = "starting"


class _Heartbeat(threading.Thread):
    """Records progress every ``interval`` seconds and watches for a reason to stop."""

    def __init__(
        self, store: JobStore, job_id: str, worker: str, interval: float, deadline: float
    ) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.store, self.job_id, self.worker = store, job_id, worker
        self.interval, self.deadline = interval, deadline
        self.progress = _Progress()
        self.stop_reason: str | None = None
        self._done = threading.Event()

    def beat(self) -> None:
        state = self.store.heartbeat(
            self.job_id, self.worker, self.progress.fraction, self.progress.stage
        )
        if state == CANCELLED or state is None:
            self.stop_reason = "cancelled"
        elif state == "taken_over" or state in FINISHED:
            self.stop_reason = "taken_over"
        elif time.monotonic() > self.deadline:
            self.stop_reason = "time_limit"

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a database hiccup must not kill the job; next beat retries
                logger.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def check(self) -> None:
        if self.stop_reason is None and time.monotonic() > self.deadline:
            self.stop_reason = "time_limit"
        if self.stop_reason is not None:
            raise JobStoppedError(self.stop_reason)

    def close(self) -> None:
        self._done.set()


def _segment(job: Any, settings: Settings, storage: Storage, hb: _Heartbeat) -> dict[str, Any]:
    predictor, checkpoints = get_predictor(settings)
    inputs = {name: storage.path(key) for name, key in job.inputs.items()}
    hb.progress.stage = "loading"
    if "image" in inputs:
        case = load_case(inputs["image"], name=job.id)
    else:
        case = load_case({m: inputs[m] for m in MODALITIES}, name=job.id)
    reference = load_labels(inputs["reference"], like=case) if "reference" in inputs else None
    hb.check()

    opts = job.options
    options = SegmentationOptions(
        remove_small=opts["postprocess"],
        relabel_edema=opts["postprocess"],
        probabilities=opts["probabilities"],
    )

    def progress(done: int, total: int) -> None:
        hb.progress.stage = "inference"
        hb.progress.fraction = 0.05 + 0.85 * done / max(total, 1)
        hb.check()

    seg = segment_case(case, predictor, options, progress)
    hb.check()
    hb.progress.stage, hb.progress.fraction = "writing", 0.92

    out = storage.outputs_dir(job.id)
    out.mkdir(parents=True, exist_ok=True)
    written = write_segmentation(
        seg,
        case,
        storage.output(job.id, "segmentation"),
        storage.output(job.id, "probabilities"),
        storage.output(job.id, "preview") if opts["preview"] else None,
        opts["label_convention"],
    )
    files = {kind: storage.key(path) for kind, path in written.items()}
    metrics: dict[str, Any] = {
        "volumes_ml": region_volumes_ml(seg.labels, case.spacing, ENHANCING),
        "label_convention": opts["label_convention"],
        "shape": list(case.shape),
        "spacing_mm": list(case.spacing),
        "timings_s": {k: round(v, 3) for k, v in seg.timings.items()},
    }
    if reference is not None:
        scores = evaluate_case(seg.labels, reference, case.spacing, ENHANCING, ENHANCING)
        metrics["reference"] = {region: m.to_dict() for region, m in scores.items()}
    metrics_path = storage.output(job.id, "metrics")
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, metrics_path)
    files["metrics"] = storage.key(metrics_path)
    model = describe_model(checkpoints)
    return {"files": files, "metrics": metrics, "model": model}


def run_job(job_id: str, settings: Settings, store: JobStore, storage: Storage) -> str:
    """Runs job ``job_id`` if this worker can claim it.

    Returns what happened: 'succeeded', 'failed', 'cancelled', 'gone' (no such job or
    already finished: nothing to do) or 'busy' (another live worker runs it; the caller
    should look again later).
    """
    me = worker_name()
    job = store.claim(job_id, me, settings.stale_after_s)
    if job is None:
        current = store.get(job_id)
        if current is None or current.state in FINISHED:
            return "gone"
        return "busy" if current.state == RUNNING else "gone"
    retention = timedelta(hours=settings.retention_hours)
    logger.info("job %s claimed by %s (attempt %d)", job_id, me, job.attempts)
    hb = _Heartbeat(
        store, job_id, me, settings.worker_heartbeat_s, time.monotonic() + settings.job_time_limit_s
    )
    hb.start()
    try:
        result = _segment(job, settings, storage, hb)
    except JobStoppedError as stop:
        if stop.reason == "time_limit":
            store.finish(
                job_id,
                me,
                FAILED,
                retention,
                error_code="time_limit_exceeded",
                error_message=f"the job ran longer than {settings.job_time_limit_s:.0f} s and "
                "was stopped; retry with a smaller case or ask the operator to raise "
                "OMNET_JOB_TIME_LIMIT_S",
            )
            shutil.rmtree(storage.outputs_dir(job_id), ignore_errors=True)
            return "failed"
        if stop.reason == "cancelled":
            storage.delete_job(job_id)
        logger.info("job %s stopped: %s", job_id, stop.reason)
        return "cancelled"
    except InputError as exc:
        store.finish(job_id, me, FAILED, retention, error_code=exc.code, error_message=str(exc))
        return "failed"
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        store.finish(
            job_id,
            me,
            FAILED,
            retention,
            error_code="internal_error",
            error_message=f"segmentation failed ({type(exc).__name__}: {exc}); it was logged",
        )
        return "failed"
    finally:
        hb.close()
    model = result.pop("model")
    done = store.finish(
        job_id,
        me,
        SUCCEEDED,
        retention,
        result=result,
        model_name=model["name"],
        model_sha256=model["sha256"],
    )
    if not done:  # cancelled (or taken over) between the last beat and now
        current = store.get(job_id)
        if current is None or current.state == CANCELLED:
            storage.delete_job(job_id)
        return "cancelled"
    return "succeeded"
