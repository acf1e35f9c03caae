"""Where a DICOM job's study is: its upload, or the folder the study is retrieved into
from the configured DICOMweb source (WADO-RS), waiting out a source that is down for a
while with the job's stage saying so.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from model.io.volumes import MODALITIES
from service.config import Settings
from service.db import Job
from service.dicom_uploads import series_overrides
from service.dicomweb import DicomWebError, retrieve_study
from service.storage import Storage
from worker.heartbeat import Heartbeat

logger = logging.getLogger(__name__)

#: Waits between retrievals of a study from a DICOMweb source that cannot send it: the
#: first, doubled each time up to the last.
RETRIEVE_FIRST_WAIT_S, RETRIEVE_MAX_WAIT_S = 2.0, 30.0


def dicom_study_path(job: Job, settings: Settings, storage: Storage, hb: Heartbeat) -> Path | None:
    """Where the job's DICOM study is: its uploaded zip or folder, or the folder its
    ``study_uid`` is retrieved into (WADO-RS) now; None for NIfTI input."""
    for name in ("study", "dicom"):
        if name in job.inputs:
            return storage.path(job.inputs[name])
    study_uid = job.options.get("study_uid")
    if not study_uid:
        return None
    endpoint = settings.dicomweb_source_endpoint()
    if endpoint is None:
        raise DicomWebError(
            "dicomweb_not_configured",
            "the workers have no DICOMweb source (OMNET_DICOMWEB_SOURCE) to retrieve the "
            "study from",
        )
    folder = storage.inputs_dir(job.id) / "retrieved"
    overrides = series_overrides(job.options)
    # Four series named by UID: only those are retrieved; otherwise the study's MR series.
    named = list(overrides.values()) if len(overrides) == len(MODALITIES) else []
    uids = named if all("." in uid for uid in named) else []

    def progress(done: int, total: int) -> None:
        hb.progress.fraction = 0.05 * done / max(total, 1)
        hb.check()

    # A source that is down for a while (a PACS restarting) holds the job up, with its
    # stage saying so, for at most dicomweb_retrieve_patience_s; then the job fails.
    deadline = time.monotonic() + settings.dicomweb_retrieve_patience_s
    wait_s = RETRIEVE_FIRST_WAIT_S
    attempt = 0
    while True:
        attempt += 1
        shutil.rmtree(folder, ignore_errors=True)  # a job taken over starts it again too
        folder.mkdir(parents=True)
        hb.progress.stage = "retrieving"
        try:
            retrieve_study(
                endpoint,
                study_uid,
                folder,
                series_uids=uids,
                max_bytes=int(settings.max_study_mb * 2**20),
                timeout_s=settings.dicomweb_timeout_s,
                progress=progress,
                retries=False,  # this loop retries, with the stage saying so
            )
            return folder
        except DicomWebError as exc:
            left = deadline - time.monotonic()
            if not exc.transient or left <= 0:
                if exc.transient and attempt > 1:
                    exc.message += (
                        f" ({attempt} attempts over {settings.dicomweb_retrieve_patience_s:.0f} s)"
                    )
                raise
            logger.warning("job %s: %s; retrying in %.0f s", job.id, exc.message, min(wait_s, left))
            hb.progress.stage = "waiting for the DICOMweb source"
            hb.pause(min(wait_s, left))
            wait_s = min(wait_s * 2, RETRIEVE_MAX_WAIT_S)
