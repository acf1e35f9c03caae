"""A few variants of the DICOM conformance corpus (tests/dicom_corpus.py) through the
real service: a uvicorn API and a Celery worker on Redis, each study uploaded as a zip.

A study that reads is segmented to the plain study's labels with a SEG that copies the
source's patient and study attributes (empty where it has none); one that cannot be
segmented, or whose SEG cannot be made, is refused at submission (422) with nothing
queued, never after inference.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from model.io.dicom.seg import COPIED_TYPE2
from tests.service.support import Api, Stack, queued_messages, redis_env
from tests.service.support import stack as make_stack

pytestmark = pytest.mark.data

ACCEPTED = ("plain", "type2_absent", "enhanced_mr", "jpeg2000")
REFUSED = ("no_frame_of_reference", "undecodable")


def _zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def _form(folder: Path) -> list:
    files = [("study", ("study.zip", _zip(folder), "application/zip"))]
    return [*files, ("destinations", (None, "")), ("preview", (None, "false"))]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, redis_url, queue_prefix, tiny_checkpoint) -> Iterator[Stack]:
    env = redis_env(redis_url, f"{queue_prefix}-dicom-corpus", tiny_checkpoint)
    with make_stack("dicom-corpus", tmp_path_factory.mktemp("dicom-corpus"), env) as stack:
        api = stack.start_api()
        stack.start_worker()
        stack.wait_api(api)
        yield stack


@pytest.fixture(scope="module")
def results(deployment, dicom_corpus) -> dict[str, dict]:
    """Every accepted variant submitted at once, then waited for."""
    client = deployment.apis[0].client("alice")
    ids = {}
    for name in ACCEPTED:
        response = client.post("/v1/jobs", files=_form(dicom_corpus.variants[name].folder))
        assert response.status_code == 202, response.text
        ids[name] = response.json()["id"]
    return {
        name: deployment.wait_state(client, job_id, ("succeeded",), timeout=240)
        for name, job_id in ids.items()
    }


def _download(api: Api, job_id: str, fmt: str) -> bytes:
    response = api.client("alice").get(f"/v1/jobs/{job_id}/segmentation?format={fmt}")
    assert response.status_code == 200, response.text
    return response.content


@pytest.mark.parametrize("name", [n for n in ACCEPTED if n != "plain"])
def test_variant_gets_the_plain_studys_labels_and_a_seg(deployment, dicom_corpus, results, name):
    api = deployment.apis[0]

    def labels(variant: str) -> np.ndarray:
        data = gzip.decompress(_download(api, results[variant]["id"], "nifti"))
        return np.asarray(nib.Nifti1Image.from_bytes(data).dataobj)

    assert np.array_equal(labels(name), labels("plain"))
    # The only warnings: the quality check's (an untrained model on a cropped case) and
    # the reader's about skull stripping.
    assert all(
        w.startswith("review recommended") or "skull-stripped" in w
        for w in results[name]["warnings"]
    )
    seg = pydicom.dcmread(io.BytesIO(_download(api, results[name]["id"], "dicom-seg")))
    source = pydicom.dcmread(
        next(p for p in sorted(dicom_corpus.variants[name].folder.rglob("*.dcm"))),
        stop_before_pixels=True,
    )
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    for keyword in COPIED_TYPE2:
        assert str(seg[keyword].value or "") == str(source.get(keyword, "") or ""), keyword


@pytest.mark.parametrize("name", REFUSED)
def test_refused_at_submission_saying_what_to_do(deployment, dicom_corpus, name):
    queue = f"{deployment.env['OMNET_QUEUE_PREFIX']}.cpu"
    before = queued_messages(deployment.env["OMNET_BROKER_URL"], queue)
    response = (
        deployment.apis[0]
        .client("alice")
        .post("/v1/jobs", files=_form(dicom_corpus.variants[name].folder))
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_series"
    assert str(deployment.storage) not in error["message"]  # no server paths
    if name == "no_frame_of_reference":
        assert "the DICOM SEG cannot be written" in error["message"]
        assert "Send it with the missing attributes filled in" in error["message"]
    else:
        assert "High-Throughput JPEG 2000" in error["message"]
        assert "Send the series uncompressed" in error["message"]
    assert queued_messages(deployment.env["OMNET_BROKER_URL"], queue) == before
