"""DICOM through the real service: a uvicorn API and a Celery worker on Redis, and a real
Orthanc with its DICOMweb plugin as the PACS.

The PACS is the Orthanc that answers at ``OMNET_TEST_ORTHANC_URL`` (default
``http://127.0.0.1:8042/dicom-web``; ``.ci/run`` starts one), else a private one this
module starts; the tests skip with a reason when neither can be had. The studies are
phantom cases written as MR series by :mod:`model.io.dicom.write_series` (the T2 on sagittal
slices, so that the worker resamples it), each with new UIDs, so a shared Orthanc is
never confused by earlier runs.

Destinations: ``pacs`` (the Orthanc above) and ``late``, a port where no server listens
until the outage test starts a second Orthanc there. Store attempts: 2, 0.2 s apart.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from model.io.dicom.protocols import Acquisition, StudyInfo
from model.io.dicom.seg import read_dicom_seg
from model.io.dicom.study import read_dicom_study
from model.io.dicom.write_series import write_study
from model.io.phantom import make_phantom
from service.config import parse_endpoint
from service.dicomweb import client, store_files
from tests.service.support import (
    Api,
    Stack,
    dicomweb_answers,
    free_port,
    queued_messages,
    redis_env,
    wait_until,
)
from tests.service.support import stack as make_stack

ORTHANC_URL = os.environ.get("OMNET_TEST_ORTHANC_URL", "http://127.0.0.1:8042/dicom-web")
SHAPE = (40, 40, 28)


@dataclass(frozen=True)
class Study:
    """A phantom study on disk: its folder, its UIDs and a zip of it."""

    folder: Path
    study_uid: str
    series: dict[str, str]  # modality -> SeriesInstanceUID

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*.dcm"))

    def zip_bytes(self, skip: str | None = None) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in self.files():
                if skip is None or skip not in path.parent.name:
                    zf.write(path, path.relative_to(self.folder).as_posix())
        return buffer.getvalue()


def _write_study(root: Path, name: str, seed: int) -> Study:
    images, _, affine = make_phantom(SHAPE, seed=seed)
    info = StudyInfo(patient_id=f"P-{name}")
    written = write_study(
        images, affine, root / name, study=info, acquisitions={"t2": Acquisition("sagittal")}
    )
    return Study(
        root / name, info.study_instance_uid, {m: s.series_instance_uid for m, s in written.items()}
    )


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Study]:
    root = tmp_path_factory.mktemp("studies")
    return {name: _write_study(root, name, seed) for seed, name in enumerate(["a", "b", "c"])}


@dataclass
class Pacs:
    url: str
    late_port: int


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, redis_url, queue_prefix, tiny_checkpoint) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("dicom-deployment")
    with make_stack("dicom", root, {}) as stack:
        url = ORTHANC_URL if dicomweb_answers(ORTHANC_URL) else stack.start_orthanc("pacs")[1]
        late_port = free_port()
        stack.env.update(
            redis_env(
                redis_url,
                f"{queue_prefix}-dicom",
                tiny_checkpoint,
                OMNET_DICOMWEB_SOURCE=url,
                OMNET_DICOMWEB_DESTINATIONS=(
                    f"pacs={url},late=http://127.0.0.1:{late_port}/dicom-web"
                ),
                OMNET_DICOMWEB_MAX_ATTEMPTS="2",
                OMNET_DICOMWEB_BACKOFF_S="0.2",
                OMNET_DICOMWEB_TIMEOUT_S="30",
                OMNET_WEBHOOK_POLL_S="0.2",
            )
        )
        stack.pacs = Pacs(url, late_port)  # type: ignore[attr-defined]
        stack.wait_api(stack.start_api())
        stack.wait_worker(stack.start_worker())
        yield stack


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    return deployment.apis[0]


def _pacs(deployment: Stack) -> Pacs:
    return deployment.pacs  # type: ignore[attr-defined,no-any-return]


def _form(files: list, data: dict[str, str]) -> list:
    """Multipart parts: the files and the option fields (a form with no file is still
    multipart, as curl -F sends it)."""
    return [*files, *((name, (None, value)) for name, value in data.items())]


def _submit(api: Api, files: list, **data: str) -> str:
    response = api.client("alice").post("/v1/jobs", files=_form(files, data))
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _nifti_labels(api: Api, job_id: str) -> np.ndarray:
    response = api.client("alice").get(f"/v1/jobs/{job_id}/segmentation")
    assert response.status_code == 200, response.text
    return np.asarray(nib.Nifti1Image.from_bytes(_gunzip(response.content)).dataobj)


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data)


def _wait_delivery(deployment: Stack, api: Api, job_id: str, status: str) -> dict:
    def reached() -> dict | None:
        body = api.client("alice").get(f"/v1/jobs/{job_id}").json()
        stores = [d for d in body["deliveries"] if d["event"].startswith("dicomweb.store:")]
        return body if stores and all(d["status"] == status for d in stores) else None

    return wait_until(reached, 60, f"the deliveries of {job_id} to be {status}", deployment, 0.2)


def _reference(study: Study) -> tuple[pydicom.Dataset, ...]:
    return read_dicom_study(study.folder).reference


# --------------------------------------------------------------------------- uploads
def test_uploaded_zip_gives_a_seg_equal_to_the_nifti(deployment, api, studies):
    study = studies["a"]
    files = [("study", ("mri.zip", study.zip_bytes(), "application/zip"))]
    job_id = _submit(api, files, destinations="")
    status = deployment.wait_state(api.client("alice"), job_id, ("succeeded",), timeout=120)
    dicom = status["metrics"]["dicom"]
    assert {m: s["uid"] for m, s in dicom["series"].items()} == study.series
    assert dicom["resampled"] == ["t2"]  # the sagittal T2, onto the axial T1ce grid
    assert status["links"]["dicom_seg"].endswith(f"/{job_id}/segmentation?format=dicom-seg")
    assert status["deliveries"] == []  # destinations="" : stored nowhere

    response = api.client("alice").get(f"/v1/jobs/{job_id}/segmentation?format=dicom-seg")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    seg_path = deployment.root / f"{job_id}.dcm"
    seg_path.write_bytes(response.content)
    labels = _nifti_labels(api, job_id)
    assert np.array_equal(read_dicom_seg(seg_path, _reference(study)), labels)
    assert labels.shape == SHAPE

    preview = api.client("alice").get(f"/v1/jobs/{job_id}/preview.dcm")
    assert preview.status_code == 200
    sc = pydicom.dcmread(io.BytesIO(preview.content))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert sc.StudyInstanceUID == study.study_uid


def test_dicom_files_as_parts(deployment, api, studies):
    study = studies["b"]
    files = [("dicom", (p.name, p.read_bytes(), "application/dicom")) for p in study.files()]
    job_id = _submit(api, files, destinations="", series=f"t1ce={study.series['t1ce']}")
    status = deployment.wait_state(api.client("alice"), job_id, ("succeeded",), timeout=120)
    assert status["options"]["series"] == f"t1ce={study.series['t1ce']}"
    assert status["metrics"]["dicom"]["series"]["t1ce"]["uid"] == study.series["t1ce"]
    assert "dicom_seg" in status["links"] and status["links"]["dicom_seg"]


@pytest.mark.parametrize(
    "case",
    [
        "not_zip",
        "missing_modality",
        "conflicting_inputs",
        "bad_uid",
        "study_not_found",
        "series_not_found",
        "unknown_destination",
        "series_on_nifti",
        "bad_series",
    ],
)
def test_bad_dicom_submissions(deployment, api, studies, phantom, case):
    study = studies["c"]
    zipped = ("study", ("mri.zip", study.zip_bytes(), "application/zip"))
    files: list = []
    data: dict[str, str] = {}
    status, code = 400, case
    if case == "not_zip":
        files = [("study", ("mri.zip", b"PK but not a zip", "application/zip"))]
    elif case == "missing_modality":
        files = [("study", ("mri.zip", study.zip_bytes(skip="flair"), "application/zip"))]
        status = 422
    elif case == "conflicting_inputs":
        files = [zipped, ("t1", ("t1.nii.gz", phantom.data["t1"], "application/gzip"))]
    elif case == "bad_uid":
        data, code = {"study_uid": "1.2.abc"}, "bad_option"
    elif case == "study_not_found":
        data, status = {"study_uid": "1.2.3.4.5.6.7.8.9"}, 422
    elif case == "series_not_found":
        _store(_pacs(deployment).url, study)
        data = {"study_uid": study.study_uid, "series": "flair=1.2.3.999"}
        status = 422
    elif case == "unknown_destination":
        files, data = [zipped], {"destinations": "pacs,nowhere"}
    elif case == "series_on_nifti":
        files, data, code = phantom.files(), {"series": "t1=1.2.3"}, "conflicting_inputs"
    elif case == "bad_series":
        files, data, code = [zipped], {"series": "dwi=1.2.3"}, "bad_option"
    before = queued_messages(deployment.env["OMNET_BROKER_URL"], _queue(deployment))
    jobs_before = sorted((deployment.storage / "jobs").iterdir())
    response = api.client("alice").post("/v1/jobs", files=_form(files, data))
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code
    assert str(deployment.storage) not in body["message"]  # no server paths
    assert queued_messages(deployment.env["OMNET_BROKER_URL"], _queue(deployment)) == before
    assert sorted((deployment.storage / "jobs").iterdir()) == jobs_before


def _queue(deployment: Stack) -> str:
    return f"{deployment.env['OMNET_QUEUE_PREFIX']}.cpu"


def test_dicom_results_of_a_nifti_job_are_refused(deployment, api, phantom):
    job_id = _submit(api, phantom.files(), preview="false")
    deployment.wait_state(api.client("alice"), job_id, ("succeeded",), timeout=120)
    client = api.client("alice")
    response = client.get(f"/v1/jobs/{job_id}/segmentation?format=dicom-seg")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_dicom_input"
    response = client.get(f"/v1/jobs/{job_id}/segmentation?format=png")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_format"
    response = client.post(f"/v1/jobs/{job_id}/deliveries/retry")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "nothing_to_retry"
    # Another tenant sees nothing of it.
    assert api.client("bob").get(f"/v1/jobs/{job_id}/preview.dcm").status_code == 404


# --------------------------------------------------------------------------- the PACS
def _store(url: str, study: Study) -> None:
    store_files(parse_endpoint("test", url), study.files(), 60)


def _series_of(url: str, study_uid: str, modality: str) -> list[dict]:
    web = client(parse_endpoint("test", url), 30)
    return web.search_for_series(study_uid, search_filters={"Modality": modality})


def _retrieve_seg(url: str, study_uid: str, folder: Path) -> Path:
    found = _series_of(url, study_uid, "SEG")
    assert len(found) == 1, found
    series_uid = found[0]["0020000E"]["Value"][0]
    web = client(parse_endpoint("test", url), 30)
    instances = web.retrieve_series(study_uid, series_uid)
    assert len(instances) == 1
    path = folder / "retrieved_seg.dcm"
    instances[0].save_as(path, enforce_file_format=True)
    return path


def test_study_uid_round_trip_through_orthanc(deployment, api, studies, tmp_path):
    """Store a study in Orthanc, submit its UID, and find the SEG back in Orthanc:
    referencing the T1ce series, its label map equal to the NIfTI result voxel for
    voxel on the T1ce grid."""
    study, pacs = studies["a"], _pacs(deployment)
    _store(pacs.url, study)
    job_id = _submit(api, [], study_uid=study.study_uid, destinations="pacs")
    client_ = api.client("alice")
    deployment.wait_state(client_, job_id, ("succeeded",), timeout=120)
    status = _wait_delivery(deployment, api, job_id, "delivered")
    (store,) = status["deliveries"]
    assert store["event"] == "dicomweb.store:pacs" and store["url"] == pacs.url
    assert store["attempts"] == 1

    seg_path = _retrieve_seg(pacs.url, study.study_uid, tmp_path)
    seg = pydicom.dcmread(seg_path)
    assert seg.StudyInstanceUID == study.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series["t1ce"]
    labels = read_dicom_seg(seg_path, _reference(study))
    assert np.array_equal(labels, _nifti_labels(api, job_id))
    assert len(_series_of(pacs.url, study.study_uid, "OT")) == 1  # the preview


def test_pacs_down_keeps_the_result_and_retries_on_demand(deployment, api, studies, tmp_path):
    study, pacs = studies["c"], _pacs(deployment)
    files = [("study", ("mri.zip", study.zip_bytes(), "application/zip"))]
    job_id = _submit(api, files, destinations="late", preview="false")
    client_ = api.client("alice")
    deployment.wait_state(client_, job_id, ("succeeded",), timeout=120)
    status = _wait_delivery(deployment, api, job_id, "failed")
    (store,) = status["deliveries"]
    assert store["attempts"] == 2 and "could not store" in store["last_error"]
    # The result stays downloadable while the PACS is down.
    seg = client_.get(f"/v1/jobs/{job_id}/segmentation?format=dicom-seg")
    assert seg.status_code == 200

    _, late_url = deployment.start_orthanc("late", port=pacs.late_port)
    response = client_.post(f"/v1/jobs/{job_id}/deliveries/retry")
    assert response.status_code == 200, response.text
    assert response.json()["deliveries"][0]["status"] == "pending"
    status = _wait_delivery(deployment, api, job_id, "delivered")
    assert status["deliveries"][0]["attempts"] == 1  # counted afresh
    seg_path = _retrieve_seg(late_url, study.study_uid, tmp_path)
    assert np.array_equal(read_dicom_seg(seg_path, _reference(study)), _nifti_labels(api, job_id))
    assert client_.post(f"/v1/jobs/{job_id}/deliveries/retry").status_code == 409


def test_study_uid_needs_a_source(tmp_path, redis_url, queue_prefix, tiny_checkpoint):
    env = redis_env(redis_url, f"{queue_prefix}-nosource", tiny_checkpoint)
    with make_stack("nosource", tmp_path, env) as stack:
        api = stack.wait_api(stack.start_api())
        client_ = api.client("alice")
        response = client_.post("/v1/jobs", files=_form([], {"study_uid": "1.2.3"}))
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "dicomweb_not_configured"
        zipped = [("study", ("s.zip", b"x", "application/zip"))]
        response = client_.post("/v1/jobs", files=_form(zipped, {"destinations": "pacs"}))
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "unknown_destination"


def test_a_source_down_after_submission_holds_the_job_until_it_is_back(
    tmp_path, redis_url, queue_prefix, tiny_checkpoint, studies
):
    """The PACS holds the study when the job is accepted, is down when the worker starts
    the job, and comes back: the job waits, its stage saying so, and then succeeds in the
    same attempt."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/dicom-web"
    env = redis_env(redis_url, f"{queue_prefix}-outage", tiny_checkpoint, OMNET_DICOMWEB_SOURCE=url)
    with make_stack("outage", tmp_path, env) as stack:
        source, _ = stack.start_orthanc("source", port=port)  # private: this test stops it
        study = studies["b"]
        _store(url, study)
        api = stack.wait_api(stack.start_api())
        job_id = _submit(api, [], study_uid=study.study_uid)
        source.stop()
        worker = stack.start_worker()
        stack.wait_worker(worker)

        client_ = api.client("alice")

        def waiting() -> bool:
            body = client_.get(f"/v1/jobs/{job_id}").json()
            assert body["state"] in ("queued", "running"), body
            return bool(body["stage"] == "waiting for the DICOMweb source")

        wait_until(waiting, 60, "the job to wait for its source", stack, 0.2)
        stack.start_orthanc("source", port=port)  # the same storage: the study is there
        stack.wait_state(client_, job_id, ("succeeded",), timeout=120)
        record = stack.record(job_id)
        assert record is not None and record.attempts == 1
        assert "retrying in" in worker.output()
