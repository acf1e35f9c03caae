"""Embedded mode: ``omnet serve`` with no broker configured (no Redis, no other server).

The API and its worker exchange messages as files in the storage folder. Results are
kept for a few seconds only here, so the clean-up of expired jobs is seen too.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from datetime import datetime

import nibabel as nib
import numpy as np
import pytest

from tests.service.support import Api, Stack, base_env, wait_until
from tests.service.support import stack as make_stack

RETENTION_HOURS = 0.002  # 7.2 s


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_checkpoint) -> Iterator[Stack]:
    env = base_env(
        tiny_checkpoint,
        OMNET_RETENTION_HOURS=str(RETENTION_HOURS),
        OMNET_CLEANUP_INTERVAL_S="1",
    )
    with make_stack("embedded", tmp_path_factory.mktemp("embedded"), env) as s:
        s.wait_api(s.start_serve())
        yield s


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    client = deployment.apis[0].client(None)
    wait_until(
        lambda: client.get("/readyz").status_code == 200,
        120,
        "the embedded worker to be ready",
        deployment,
        0.5,
    )
    return deployment.apis[0]


def test_embedded_round_trip(deployment, api, phantom):
    ready = api.client(None).get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "storage": "ok", "broker": "ok", "workers": 1}
    assert "OMNET_BROKER_URL" not in deployment.env

    client = api.client("bob")
    response = client.post("/v1/jobs", files=phantom.files(with_reference=True))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    status = deployment.wait_state(client, job_id, ("succeeded",), timeout=120)
    assert status["attempts"] == 1
    assert "dice" in status["metrics"]["reference"]["WT"]

    seg = client.get(f"/v1/jobs/{job_id}/segmentation")
    assert seg.status_code == 200, seg.text
    image = nib.Nifti1Image.from_bytes(gzip.decompress(seg.content))
    assert image.shape == phantom.shape
    np.testing.assert_allclose(image.affine, phantom.affine, atol=1e-4)
    assert set(np.unique(np.asarray(image.dataobj)).tolist()) <= {0, 1, 2, 4}
    # The messages went through the storage folder, not a server.
    assert (deployment.storage / "broker" / "queue").is_dir()


def test_finished_jobs_expire(deployment, api, phantom):
    client = api.client("alice")
    response = client.post("/v1/jobs", files=phantom.files(), data={"preview": "false"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    serve = deployment.procs[0]
    wait_until(
        lambda: f"job {job_id}: succeeded" in serve.output(),
        120,
        "the job to succeed",
        deployment,
    )
    record = deployment.record(job_id)
    if record is not None:  # not purged yet: it expires after the retention period
        assert record.finished_at is not None and record.expires_at is not None
        kept = (record.expires_at - record.finished_at).total_seconds()
        assert kept == pytest.approx(RETENTION_HOURS * 3600, abs=0.01)

    def purged() -> bool:
        return client.get(f"/v1/jobs/{job_id}").status_code == 404

    wait_until(purged, 30, "the expired job to be purged", deployment, 0.5)
    assert client.get(f"/v1/jobs/{job_id}").json()["error"]["code"] == "job_not_found"
    assert deployment.record(job_id) is None
    assert not deployment.job_dir(job_id).exists(), "the expired job's files remain"
    assert client.get("/v1/jobs").json()["total"] == 0
    # Every finished job went: none is left with an expiry in the past.
    assert deployment.store.expired(datetime.max) == []
