"""GET /v1/jobs/{id}/inputs/{modality} on a real API process (uvicorn, no worker: the
inputs are there from submission on, so the jobs may stay queued)."""

from __future__ import annotations

import bz2
import gzip
import io
import zipfile
from collections.abc import Iterator

import nibabel as nib
import numpy as np
import pytest

from model.io.dicom.protocols import StudyInfo
from model.io.dicom.write_series import write_study
from model.io.phantom import make_phantom
from tests.service.support import MODALITY_FIELDS, Api, Phantom, Stack, base_env, nifti_gz
from tests.service.support import stack as make_stack


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_checkpoint) -> Iterator[Stack]:
    with make_stack("inputs", tmp_path_factory.mktemp("inputs"), base_env(tiny_checkpoint)) as s:
        s.wait_api(s.start_api())
        yield s


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    return deployment.apis[0]


def _submit(api: Api, files, owner: str = "alice") -> str:
    response = api.client(owner).post("/v1/jobs", files=files)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_each_modality_as_sent_to_its_owner_only(api: Api, phantom: Phantom) -> None:
    job = _submit(api, phantom.files())
    alice = api.client("alice")
    for m in MODALITY_FIELDS:
        response = alice.get(f"/v1/jobs/{job}/inputs/{m}")
        assert response.status_code == 200, response.text
        assert response.content == phantom.data[m]  # the file as uploaded
        assert response.headers["content-type"] == "application/gzip"
        assert f'filename="{job}_{m}.nii.gz"' in response.headers["content-disposition"]
    other = api.client("bob").get(f"/v1/jobs/{job}/inputs/flair")
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    keyless = api.client(None).get(f"/v1/jobs/{job}/inputs/flair")
    assert keyless.status_code == 401
    unknown = alice.get(f"/v1/jobs/{job}/inputs/seg")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_modality"
    assert "t1, t1ce, t2, flair" in unknown.json()["error"]["message"]


def test_a_4d_upload_answers_each_volume(api: Api, phantom: Phantom) -> None:
    stacked = np.stack([phantom.images[m] for m in MODALITY_FIELDS], axis=-1)
    job = _submit(api, [("image", ("case.nii.gz", nifti_gz(stacked, phantom.affine), "x"))])
    for m in MODALITY_FIELDS:  # the fourth axis in MODALITIES order
        response = api.client("alice").get(f"/v1/jobs/{job}/inputs/{m}")
        assert response.status_code == 200, response.text
        volume = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
        np.testing.assert_array_equal(np.asarray(volume.dataobj), phantom.images[m])
        np.testing.assert_allclose(volume.affine, phantom.affine)


def test_a_bz2_upload_is_answered_uncompressed(api: Api, phantom: Phantom) -> None:
    flair = bz2.compress(gzip.decompress(phantom.data["flair"]))
    job = _submit(api, phantom.files(flair=("case_flair.nii.bz2", flair)))
    response = api.client("alice").get(f"/v1/jobs/{job}/inputs/flair")
    assert response.status_code == 200, response.text
    assert response.content == gzip.decompress(phantom.data["flair"])
    assert f'filename="{job}_flair.nii"' in response.headers["content-disposition"]


def test_a_deleted_job_and_a_dicom_job_say_why_there_is_nothing(
    api: Api, phantom: Phantom, tmp_path
) -> None:
    alice = api.client("alice")
    job = _submit(api, phantom.files())
    assert alice.delete(f"/v1/jobs/{job}").status_code == 200  # cancelled: files deleted
    gone = alice.get(f"/v1/jobs/{job}/inputs/t1")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "expired"

    images, _, affine = make_phantom((24, 24, 16), seed=1)
    write_study(images, affine, tmp_path / "study", study=StudyInfo(patient_id="P-web"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted((tmp_path / "study").rglob("*.dcm")):
            zf.write(path, path.relative_to(tmp_path).as_posix())
    job = _submit(api, [("study", ("study.zip", buffer.getvalue(), "application/zip"))])
    response = alice.get(f"/v1/jobs/{job}/inputs/flair")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "input_not_stored"
    assert "sent as DICOM" in response.json()["error"]["message"]
