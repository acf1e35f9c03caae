"""GET /v1/jobs/{id}/inputs/{modality}: a job's input volume as it was sent, for viewers.

The same owner check and retention as the job's other routes (:mod:`service.routes.jobs`):
a job of another owner is ``job_not_found``, and the inputs stay until the job's record
expires (a cancelled or deleted job's files go at once: ``expired``).
"""

from __future__ import annotations

import bz2
import gzip
from typing import Annotated

import nibabel as nib
import numpy as np
from fastapi import APIRouter, Path, Response
from fastapi.responses import FileResponse

from model.io.volumes import MODALITIES
from service.db import Job
from service.deps import OwnerDep, StorageDep, StoreDep
from service.errors import ApiError
from service.routes.jobs import ERRORS, _owned
from service.storage import Storage

router = APIRouter(prefix="/v1", tags=["jobs"])

#: Input fields that hold a DICOM study rather than NIfTI volumes.
DICOM_FIELDS = ("study", "dicom")


def _stored(storage: Storage, job: Job, field: str) -> str:
    path = storage.path(job.inputs[field])
    if not path.is_file():
        raise ApiError(404, "expired", f"the inputs of job {job.id} are no longer stored")
    return str(path)


def _channel(path: str, index: int) -> bytes:
    """Volume ``index`` of a 4D NIfTI file, as a gzipped 3D NIfTI-1 file's bytes."""
    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Image):  # NIfTI-2 derives from it
        raise ApiError(404, "expired", f"{path} is no longer a NIfTI file")
    data = np.asarray(img.dataobj[..., index])  # (X, Y, Z)
    header = img.header.copy()
    out = nib.Nifti1Image(data, img.affine, nib.Nifti1Header.from_header(header))
    return gzip.compress(out.to_bytes(), compresslevel=1)


@router.get(
    "/jobs/{job_id}/inputs/{modality}",
    response_class=FileResponse,
    responses=ERRORS,
    summary="An input volume of the job (NIfTI), as sent: t1, t1ce, t2 or flair",
    description=(
        "The volume the job was submitted with, for viewing beside its segmentation: the "
        "file as uploaded (.nii or .nii.gz; a .nii.bz2 upload is answered uncompressed, "
        "one volume of a 4D `image` upload gzipped). Jobs sent as DICOM answer 404 "
        "`input_not_stored`: the volumes the worker read from the study are not kept."
    ),
)
def get_input(
    job_id: str,
    modality: Annotated[str, Path(description="t1, t1ce, t2 or flair")],
    store: StoreDep,
    storage: StorageDep,
    owner: OwnerDep,
) -> Response:
    job = _owned(store, job_id, owner)
    if modality not in MODALITIES:
        raise ApiError(
            404,
            "unknown_modality",
            f"no input {modality!r}; inputs are {', '.join(MODALITIES)}",
        )
    filename = f"{job.id}_{modality}"
    if modality in job.inputs:
        path = _stored(storage, job, modality)
        if path.endswith(".bz2"):
            with bz2.open(path, "rb") as src:
                data = src.read()
            return _attachment(data, f"{filename}.nii", "application/octet-stream")
        ending = ".nii.gz" if path.endswith(".gz") else ".nii"
        media = "application/gzip" if ending == ".nii.gz" else "application/octet-stream"
        return FileResponse(path, media_type=media, filename=f"{filename}{ending}")
    if "image" in job.inputs:
        data = _channel(_stored(storage, job, "image"), MODALITIES.index(modality))
        return _attachment(data, f"{filename}.nii.gz", "application/gzip")
    if job.options.get("study_uid") or any(f in job.inputs for f in DICOM_FIELDS):
        raise ApiError(
            404,
            "input_not_stored",
            f"job {job.id} was sent as DICOM; the volumes the worker read from the study are "
            "not stored, so only its segmentation can be shown (view the study itself in "
            "your PACS viewer)",
        )
    raise ApiError(404, "expired", f"the inputs of job {job.id} are no longer stored")


def _attachment(data: bytes, filename: str, media_type: str) -> Response:
    return Response(
        data,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
