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
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy.exc as sa_exc

from model.atomic import atomic_write_text
from model.defaults import NO_POSTPROCESS
from model.inference.case import CaseOutputs, process_case
from model.inference.pipeline import SegmentationOptions, load_predictor
from model.inference.report import InferenceInfo
from model.inference.tiling import TILINGS, Predictor
from model.io.dicom.study import read_dicom_study
from model.io.volumes import MODALITIES, InputError
from model.net.checkpoint import Checkpoint, describe_checkpoints
from service.config import Settings
from service.db import Job, JobState, JobStore, utcnow
from service.dicom_uploads import job_destinations, series_overrides, series_rules
from service.dicomweb import DicomWebError, store_deliveries
from service.recovery import fail_exhausted, worker_name
from service.storage import Storage
from service.webhooks import completion_event
from worker.dicom_source import dicom_study_path
from worker.heartbeat import Heartbeat, JobStoppedError, StopReason

logger = logging.getLogger(__name__)


class RunOutcome(StrEnum):
    """What :func:`run_job` did with a job (the Celery task returns and logs it)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: The owner cancelled it (or deleted it) while it ran; its files are deleted.
    CANCELLED = "cancelled"
    #: Another worker claimed it (this one was silent too long); its record and files
    #: are that worker's now.
    TAKEN_OVER = "taken_over"
    #: No such job, or already finished: nothing to do.
    GONE = "gone"
    #: Another live worker runs it; the caller should look again later.
    BUSY = "busy"


#: Waits between tries of a change to a job's record that the job database did not take:
#: the first, doubled each time up to the last.
DATABASE_FIRST_WAIT_S, DATABASE_MAX_WAIT_S = 0.5, 5.0

T = TypeVar("T")


def _persist(call: Callable[[], T], job_id: str, what: str, patience_s: float) -> T:
    """``call``, a change to job ``job_id``'s record, tried again while the job database
    does not answer (busy past its timeout, restarting, failing over), for up to
    ``patience_s``. A database blip then delays the job instead of failing its message
    (which would wait for the reconciliation) or losing a computed result (which another
    worker would compute again)."""
    deadline = time.monotonic() + patience_s
    wait_s = DATABASE_FIRST_WAIT_S
    while True:
        try:
            return call()
        except sa_exc.OperationalError as exc:
            if time.monotonic() + wait_s > deadline:
                raise
            logger.warning(
                "job %s: the job database did not %s (%s); trying again in %.1f s",
                job_id,
                what,
                str(exc).splitlines()[0][:200],
                wait_s,
            )
            time.sleep(wait_s)
            wait_s = min(wait_s * 2, DATABASE_MAX_WAIT_S)


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
                tta=settings.tta,
                precision=settings.precision,
            )
            logger.info("loaded %s on %s", [c.name for c in _loaded[1]], _loaded[0].device)
        return _loaded


def _segment(job: Job, settings: Settings, storage: Storage, hb: Heartbeat) -> dict[str, Any]:
    """Runs the job's case, NIfTI or DICOM, through :func:`model.inference.case.process_case`;
    returns the files, report and model of the job's result (and the outputs that failed)."""
    predictor, checkpoints = get_predictor(settings)
    inputs = {name: storage.path(key) for name, key in job.inputs.items()}
    opts = job.options
    study_path = dicom_study_path(job, settings, storage, hb)
    source: Any
    started = time.perf_counter()
    if study_path is not None:
        hb.progress.stage = "converting"
        source = read_dicom_study(
            study_path,
            name=job.id,
            rules=series_rules(settings),
            overrides=series_overrides(opts),
            max_bytes=int(settings.max_study_mb * 2**20),
        )
    else:
        source = inputs["image"] if "image" in inputs else {m: inputs[m] for m in MODALITIES}
    read_s = time.perf_counter() - started  # a study's conversion; NIfTI is read below
    mode = settings.postprocess if opts["postprocess"] else NO_POSTPROCESS
    options = SegmentationOptions.for_postprocess(mode, opts["probabilities"], settings.fusion)
    dicom = study_path is not None
    outputs = CaseOutputs(
        storage.output(job.id, "segmentation"),
        storage.output(job.id, "probabilities") if opts["probabilities"] else None,
        storage.output(job.id, "preview") if opts["preview"] else None,
        storage.output(job.id, "dicom_seg") if dicom else None,
        storage.output(job.id, "dicom_preview") if dicom and opts["preview"] else None,
    )
    model = describe_checkpoints(checkpoints)
    inference = InferenceInfo.describe(
        model,
        tiling=settings.tiling,
        tta=settings.tta,
        device=str(predictor.device),
        precision=predictor.precision,
        batch_size=predictor.batch_size,
        postprocess=mode,
        fusion=settings.fusion,
    )

    def progress(done: int, total: int) -> None:
        hb.progress.stage = "inference"
        hb.progress.fraction = 0.05 + 0.85 * done / max(total, 1)

    hb.progress.stage = "loading"
    report = process_case(
        source,
        predictor,
        outputs,
        options,
        name=job.id,
        reference=inputs.get("reference"),
        et_label=opts["label_convention"],
        progress=progress,
        check=hb.check,
        inference=inference,
        read_s=read_s,
    )
    hb.progress.stage, hb.progress.fraction = "writing", 0.92
    for failure in report.failures.values():
        logger.warning("job %s: %s", job.id, failure)
    # Files by name only: the storage's paths mean nothing to the job's owner.
    document = report.to_dict(paths=lambda path: Path(path).name)
    files = {kind: storage.key(path) for kind, path in report.outputs.items()}
    metrics_path = atomic_write_text(
        storage.output(job.id, "metrics"), json.dumps(document, indent=2) + "\n"
    )
    files["metrics"] = storage.key(metrics_path)
    result: dict[str, Any] = {"files": files, "metrics": document, "model": model}
    if report.failures:
        result["failed"] = report.failures  # kind -> what went wrong, for the download routes
    return result


def _finish(
    store: JobStore,
    job_id: str,
    worker: str,
    state: JobState,
    settings: Settings,
    **fields: Any,
) -> bool:
    """:meth:`JobStore.finish` with the configured retention, tried again through a
    database blink (:func:`_persist`); False when the job is no longer this worker's."""
    what = "record the result" if state == JobState.SUCCEEDED else "record the failure"
    return _persist(
        lambda: store.finish(
            job_id, worker, state, timedelta(hours=settings.retention_hours), **fields
        ),
        job_id,
        what,
        settings.stale_after_s,
    )


def _fail(
    job: Job,
    worker: str,
    store: JobStore,
    storage: Storage,
    settings: Settings,
    code: str,
    message: str,
) -> RunOutcome:
    """Records the job failed (with its webhook event) and removes its partial outputs
    (its inputs stay, so that the owner can see what was sent until the record expires)."""
    job_id = job.id
    event = completion_event(job, JobState.FAILED, error=(code, message))
    finished = _finish(
        store,
        job_id,
        worker,
        JobState.FAILED,
        settings,
        error_code=code,
        error_message=message,
        event=event,
    )
    if not finished:
        return _lost(job_id, store, storage)
    shutil.rmtree(storage.outputs_dir(job_id), ignore_errors=True)
    return RunOutcome.FAILED


def _lost(job_id: str, store: JobStore, storage: Storage) -> RunOutcome:
    """What became of a job this worker ran but no longer holds.

    Cancelled (or deleted) by its owner: its files go. Taken over by another worker (this
    one was silent too long): the record and the files are that worker's; nothing is
    touched.
    """
    current = store.get(job_id)
    if current is None or current.state == JobState.CANCELLED:
        storage.delete_job(job_id)
        logger.info("job %s was cancelled while it ran; its files were deleted", job_id)
        return RunOutcome.CANCELLED
    logger.warning(
        "job %s was taken over by %s (now %s); leaving it to that worker",
        job_id,
        current.worker,
        current.state,
    )
    return RunOutcome.TAKEN_OVER


#: When this process started (a pool child: when it was forked), in the job store's
#: clock: a claim under this process's name made before it is an earlier process's.
_process_started_at = utcnow()


def _restart_clock() -> None:
    global _process_started_at
    _process_started_at = utcnow()


os.register_at_fork(after_in_child=_restart_clock)


def run_job(job_id: str, settings: Settings, store: JobStore, storage: Storage) -> RunOutcome:
    """Runs job ``job_id`` if this worker can claim it, and says what happened. A job
    whose workers stopped while running it ``max_attempts`` times is not started again:
    it fails with :data:`~service.recovery.WORKER_LOST`."""
    me = worker_name()
    job = _persist(
        lambda: store.claim(job_id, me, settings.stale_after_s, settings.max_attempts),
        job_id,
        "take the claim",
        settings.stale_after_s,
    )
    if job is None:
        current = store.get(job_id)
        if current is not None and fail_exhausted(current, settings, store, storage):
            return RunOutcome.FAILED
        if current is None or current.state != JobState.RUNNING:
            return RunOutcome.GONE
        if current.worker != me:
            return RunOutcome.BUSY
        if current.started_at is not None and current.started_at < _process_started_at:
            # Claimed under this name before this process started: an earlier process
            # with the same host name and pid (a restarted container) died running it.
            # Released and claimed again, so that this start counts as an attempt.
            store.release(me, job_id)
            return run_job(job_id, settings, store, storage)
        # This process's own claim (it runs one job at a time): a commit that went through
        # while its answer was lost, or an earlier run here that ended without a record.
        job = current
    logger.info("job %s claimed by %s (attempt %d)", job_id, me, job.attempts)
    hb = Heartbeat(
        store, job_id, me, settings.worker_heartbeat_s, time.monotonic() + settings.job_time_limit_s
    )
    hb.start()
    try:
        result = _segment(job, settings, storage, hb)
    except JobStoppedError as stop:
        if stop.reason != StopReason.TIME_LIMIT:
            return _lost(job_id, store, storage)
        return _fail(
            job,
            me,
            store,
            storage,
            settings,
            "time_limit_exceeded",
            f"the job ran longer than {settings.job_time_limit_s:.0f} s and was stopped; "
            "retry with a smaller case or ask the operator to raise OMNET_JOB_TIME_LIMIT_S",
        )
    except InputError as exc:
        return _fail(job, me, store, storage, settings, exc.code, str(exc))
    except DicomWebError as exc:
        return _fail(job, me, store, storage, settings, exc.code, exc.message)
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        return _fail(
            job,
            me,
            store,
            storage,
            settings,
            "internal_error",
            f"segmentation failed ({type(exc).__name__}: {exc}); it was logged",
        )
    finally:
        hb.close()
    model = result.pop("model")
    volumes = result.get("metrics", {}).get("volumes_ml")
    event = completion_event(job, JobState.SUCCEEDED, volumes_ml=volumes)
    files = result["files"]
    stores = []
    if "dicom_seg" in files:
        kinds = ("dicom_seg", "dicom_preview")
        stores = store_deliveries(
            job_id,
            job.owner,
            job_destinations(job.options, settings),
            [files[k] for k in kinds if k in files],
        )
    done = _finish(
        store,
        job_id,
        me,
        JobState.SUCCEEDED,
        settings,
        result=result,
        model_name=model["name"],
        model_sha256=model["sha256"],
        event=event,
        deliveries=stores,
    )
    if not done:  # cancelled or taken over between the last beat and now
        return _lost(job_id, store, storage)
    return RunOutcome.SUCCEEDED
