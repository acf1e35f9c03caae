"""Jobs through the real service: a uvicorn API and a Celery worker process on Redis.

The module's jobs are submitted while the worker starts, so they queue up; the tests
then follow them to their results. The worker serves a tiny random-weight checkpoint,
so the segmentations are not good, but they are deterministic and on the input's grid.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.service.support import Api, Phantom, Stack, redis_env, wait_until
from tests.service.support import stack as make_stack


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, redis_url, queue_prefix, tiny_checkpoint) -> Iterator[Stack]:
    env = redis_env(redis_url, f"{queue_prefix}-jobs", tiny_checkpoint)
    with make_stack("jobs", tmp_path_factory.mktemp("jobs"), env) as s:
        api = s.start_api()
        s.start_worker("worker")
        s.wait_api(api)
        yield s


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    return deployment.apis[0]


@dataclass
class Submitted:
    basic: str  # defaults (post-processing, preview), with a reference
    lc3: str  # label_convention=3, probabilities, no preview; sent twice
    retry_ids: tuple[str, str]
    totals: tuple[int, int]  # alice's job count before and after the two identical POSTs


@pytest.fixture(scope="module")
def submitted(api: Api, phantom: Phantom) -> Submitted:
    alice = api.client("alice")
    response = alice.post("/v1/jobs", files=phantom.files(with_reference=True))
    assert response.status_code == 202, response.text
    basic = response.json()
    assert basic["state"] == "queued"
    assert response.headers["location"] == basic["status_url"]
    before = alice.get("/v1/jobs").json()["total"]
    options = {"label_convention": "3", "probabilities": "true", "preview": "false"}
    retried = []
    for _ in range(2):
        response = alice.post(
            "/v1/jobs",
            files=phantom.files(),
            data=options,
            headers={"Idempotency-Key": "retry-me-1"},
        )
        assert response.status_code == 202, response.text
        retried.append(response.json()["id"])
    after = alice.get("/v1/jobs").json()["total"]
    return Submitted(basic["id"], retried[0], (retried[0], retried[1]), (before, after))


@pytest.fixture(scope="module")
def worker(deployment: Stack, submitted: Submitted) -> str:
    """The worker's record name, once it has loaded its model (jobs are queued first)."""
    return deployment.wait_worker(deployment.procs[1])


def _nifti(response: httpx.Response) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text
    assert response.content[:2] == b"\x1f\x8b", "not gzip-compressed"
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(pred & ref) / (np.count_nonzero(pred) + np.count_nonzero(ref))


def _succeeded(deployment: Stack, api: Api, job_id: str) -> dict:
    status = deployment.wait_state(api.client("alice"), job_id, ("succeeded",), timeout=120)
    assert status["progress"] == 1.0 and status["error"] is None
    return status


# --------------------------------------------------------------------------- system
def test_health_readiness_and_model(api, worker, checkpoint_sha256, queue_prefix):
    assert api.client(None).get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = api.client(None).get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert ready.json()["checks"] == {
        "database": "ok",
        "storage": "ok",
        "broker": "ok",
        "workers": 1,
    }

    served = api.client("bob").get("/v1/model")
    assert served.status_code == 200
    body = served.json()
    assert [w["name"] for w in body["workers"]] == [worker]
    assert body["workers"][0]["device"] == "cpu"
    assert body["workers"][0]["queue"] == f"{queue_prefix}-jobs.cpu"
    assert body["workers"][0]["model"] == "tiny.pt"
    assert [m["sha256"] for m in body["models"]] == [checkpoint_sha256]
    assert body["models"][0]["checkpoints"][0]["width"] == 4


def test_cancel_queued_job_while_worker_is_busy(deployment, api, phantom, submitted, worker):
    """A job queued behind others is cancelled: its files go, and the worker skips it."""
    bob = api.client("bob")
    # A backlog that outlasts the uploads below, so the job is still queued when cancelled.
    backlog = [bob.post("/v1/jobs", files=phantom.files()) for _ in range(10)]
    assert all(r.status_code == 202 for r in backlog)
    response = bob.post("/v1/jobs", files=phantom.files())
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert response.json()["queue_position"] >= 2, "the worker was not busy"
    assert deployment.job_dir(job_id).is_dir()

    cancelled = bob.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["started_at"] is None
    assert not deployment.job_dir(job_id).exists(), "the cancelled job's files remain"

    # The worker gets the message after the jobs before it, and drops it.
    wait_until(
        lambda: f"job {job_id}: gone" in deployment.procs[1].output(),
        120,
        "the worker to drop the cancelled job",
        deployment,
    )
    record = deployment.record(job_id)
    assert record is not None
    assert (record.state, record.attempts, record.started_at, record.worker) == (
        "cancelled",
        0,
        None,
        None,
    )
    assert not deployment.job_dir(job_id).exists()
    assert bob.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


# --------------------------------------------------------------------------- results
def test_segmentation_on_the_input_grid(deployment, api, phantom, submitted, worker):
    status = _succeeded(deployment, api, submitted.basic)
    assert status["attempts"] == 1
    assert status["model"]["name"] == "tiny.pt"
    assert status["options"] == {
        "postprocess": True,
        "label_convention": 4,
        "probabilities": False,
        "preview": True,
        "callback_url": None,
        "study_uid": None,
        "series": None,
        "destinations": None,
    }
    assert status["deliveries"] == []
    # A phantom with an untrained model is no real result: the quality check says so, and
    # that is the only warning.
    quality = status["quality"]
    assert set(quality) == {"review_recommended", "flags", "measures", "notes"}
    assert [w for w in status["warnings"] if not w.startswith("review recommended")] == []
    assert quality["review_recommended"] == any(
        w.startswith("review recommended") for w in status["warnings"]
    )
    links = status["links"]
    assert links["segmentation"].endswith(f"/v1/jobs/{submitted.basic}/segmentation")
    assert links["probabilities"] is None

    seg = _nifti(api.client("alice").get(f"/v1/jobs/{submitted.basic}/segmentation"))
    labels = np.asarray(seg.dataobj)
    assert seg.shape == phantom.shape
    np.testing.assert_allclose(seg.affine, phantom.affine, atol=1e-4)
    assert np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    assert np.count_nonzero(labels) > 0


def test_metrics_against_the_reference(deployment, api, phantom, submitted, worker):
    status = _succeeded(deployment, api, submitted.basic)
    client = api.client("alice")
    labels = np.asarray(_nifti(client.get(f"/v1/jobs/{submitted.basic}/segmentation")).dataobj)
    response = client.get(f"/v1/jobs/{submitted.basic}/metrics")
    assert response.status_code == 200
    metrics = response.json()
    assert metrics["shape"] == list(phantom.shape)
    assert metrics["label_convention"] == 4
    assert metrics["report_version"] == 1
    reference = metrics["evaluation"]["metrics"]
    ref = phantom.labels
    regions = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    for region, values in regions.items():
        for key in ("dice", "hd95", "sensitivity", "ppv"):
            assert key in reference[region], (region, key)
        expected = _dice(np.isin(labels, values), np.isin(ref, values))
        assert reference[region]["dice"] == pytest.approx(expected, abs=1e-9), region
        volume = np.count_nonzero(np.isin(labels, values)) / 1000.0  # 1 mm voxels
        assert metrics["volumes_ml"][region] == pytest.approx(volume, abs=1e-3), region
    # The status carries the same report; files are named, storage paths never shown.
    assert status["metrics"] == metrics
    assert metrics["outputs"]["segmentation"] == "segmentation.nii.gz"
    assert "/" not in metrics["evaluation"]["reference"]
    assert metrics["inference"]["model_name"] == status["model"]["name"]


def test_preview_given_and_probabilities_not_requested(deployment, api, submitted, worker):
    _succeeded(deployment, api, submitted.basic)
    client = api.client("alice")
    preview = client.get(f"/v1/jobs/{submitted.basic}/preview.png")
    assert preview.status_code == 200
    assert preview.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(preview.content))
    assert image.format == "PNG" and min(image.size) > 16

    missing = client.get(f"/v1/jobs/{submitted.basic}/probabilities")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_requested"


def test_idempotent_retry_makes_one_job(api, submitted):
    assert submitted.retry_ids[0] == submitted.retry_ids[1]
    before, after = submitted.totals
    assert after == before + 1
    listed = [j["id"] for j in api.client("alice").get("/v1/jobs").json()["items"]]
    assert listed.count(submitted.lc3) == 1
    # The same key is another job for another caller.
    other = api.client("bob").get("/v1/jobs").json()["items"]
    assert submitted.lc3 not in [j["id"] for j in other]


def test_label_convention_3_and_probabilities(deployment, api, phantom, submitted, worker):
    status = _succeeded(deployment, api, submitted.lc3)
    assert status["options"]["label_convention"] == 3
    assert status["links"]["preview"] is None
    client = api.client("alice")
    seg3 = np.asarray(_nifti(client.get(f"/v1/jobs/{submitted.lc3}/segmentation")).dataobj)
    _succeeded(deployment, api, submitted.basic)
    seg4 = np.asarray(_nifti(client.get(f"/v1/jobs/{submitted.basic}/segmentation")).dataobj)
    assert np.any(seg4 == 4), "the model predicts no enhancing tumour: the check is void"
    assert set(np.unique(seg3).tolist()) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(seg3, np.where(seg4 == 4, 3, seg4))
    assert client.get(f"/v1/jobs/{submitted.lc3}/metrics").json()["label_convention"] == 3

    probs = _nifti(client.get(f"/v1/jobs/{submitted.lc3}/probabilities"))
    assert probs.shape == (*phantom.shape, 4)
    np.testing.assert_allclose(probs.affine, phantom.affine, atol=1e-4)
    p = np.asarray(probs.dataobj, dtype=np.float64)
    assert p.min() >= 0.0 and p.max() <= 1.0
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-3)

    missing = client.get(f"/v1/jobs/{submitted.lc3}/preview.png")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_requested"


# --------------------------------------------------------------------------- access
def test_api_keys_isolate_jobs(deployment, api, phantom, submitted, worker):
    _succeeded(deployment, api, submitted.basic)
    alice, bob = api.client("alice"), api.client("bob")
    assert bob.post("/v1/jobs", files=phantom.files()).status_code == 202
    for path in ("", "/segmentation", "/metrics", "/preview.png", "/probabilities"):
        response = bob.get(f"/v1/jobs/{submitted.basic}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "job_not_found"
    refused = bob.delete(f"/v1/jobs/{submitted.basic}")
    assert refused.status_code == 404
    assert alice.get(f"/v1/jobs/{submitted.basic}").json()["state"] == "succeeded"
    assert deployment.job_dir(submitted.basic).is_dir()

    alice_ids = {j["id"] for j in alice.get("/v1/jobs").json()["items"]}
    bob_page = bob.get("/v1/jobs").json()
    bob_ids = {j["id"] for j in bob_page["items"]}
    assert {submitted.basic, submitted.lc3} <= alice_ids
    assert bob_ids and not bob_ids & alice_ids
    assert bob_page["total"] == len(bob_ids)
    paged = alice.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
    assert (paged["limit"], paged["offset"], len(paged["items"])) == (1, 1, 1)


def test_odd_requests_are_4xx(deployment, api, phantom, worker):
    alice = api.client("alice")
    unknown = "00000000-0000-0000-0000-000000000000"
    for method, path, status, code in [
        ("GET", f"/v1/jobs/{unknown}", 404, "job_not_found"),
        ("GET", "/v1/jobs/not-a-uuid/segmentation", 404, "job_not_found"),
        ("DELETE", f"/v1/jobs/{unknown}", 404, "job_not_found"),
        ("GET", "/v1/jobs?limit=0", 422, "invalid_request"),
        ("GET", "/v1/jobs?offset=-1", 422, "invalid_request"),
        ("PUT", "/v1/jobs", 405, "method_not_allowed"),
        ("GET", "/v2/jobs", 404, "not_found"),
    ]:
        response = alice.request(method, path)
        assert response.status_code == status, (method, path, response.text)
        assert response.json()["error"]["code"] == code, (method, path)

    # A finished job: deleted with its files, then gone.
    finished = alice.post("/v1/jobs", files=phantom.files(), data={"preview": "false"})
    assert finished.status_code == 202, finished.text
    job_id = finished.json()["id"]
    _succeeded(deployment, api, job_id)
    first = alice.delete(f"/v1/jobs/{job_id}")
    assert first.status_code == 204
    assert not deployment.job_dir(job_id).exists()
    again = alice.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "job_not_found"
    assert alice.get(f"/v1/jobs/{job_id}/segmentation").status_code == 404

    # A cancelled job has no results: 409, then DELETE removes its record.
    bob = api.client("bob")
    queued = bob.post("/v1/jobs", files=phantom.files())
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["id"]
    assert bob.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    no_result = bob.get(f"/v1/jobs/{job_id}/segmentation")
    assert no_result.status_code == 409 and no_result.json()["error"]["code"] == "no_result"
    assert bob.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert bob.get(f"/v1/jobs/{job_id}").status_code == 404


def test_prometheus_metrics(api, submitted, deployment, worker):
    _succeeded(deployment, api, submitted.basic)
    text = api.client(None).get("/metrics").text
    jobs = dict(re.findall(r'^omnet_jobs\{state="(\w+)"\} ([0-9.]+)$', text, re.MULTILINE))
    assert float(jobs["succeeded"]) >= 1
    assert set(jobs) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert re.search(r"^omnet_queue_depth ", text, re.MULTILINE)
    requests = [line for line in text.splitlines() if line.startswith("omnet_http_requests_total{")]
    assert any('route="/v1/jobs/{job_id}"' in line and 'status="200"' in line for line in requests)
    assert any('method="POST"' in line and 'status="202"' in line for line in requests)
    assert not [line for line in requests if 'status="500"' in line], requests


def test_bz2_volumes_are_accepted_and_segmented(deployment, api, phantom, worker):
    # .nii.bz2 uploads (one modality and the reference) give the same label map as .nii.gz.
    def bz2_of(name: str) -> bytes:
        return bz2.compress(gzip.decompress(phantom.data[name]))

    alice = api.client("alice")
    files = phantom.files(
        with_reference=True,
        t1=("case_t1.nii.bz2", bz2_of("t1")),
        reference=("case_seg.nii.bz2", bz2_of("reference")),
    )
    response = alice.post("/v1/jobs", files=files)
    assert response.status_code == 202, response.text
    job = response.json()["id"]
    plain = alice.post("/v1/jobs", files=phantom.files(with_reference=True))
    assert plain.status_code == 202, plain.text
    status = _succeeded(deployment, api, job)
    _succeeded(deployment, api, plain.json()["id"])
    assert status["metrics"]["evaluation"] is not None
    got = np.asarray(_nifti(alice.get(f"/v1/jobs/{job}/segmentation")).dataobj)
    want = np.asarray(_nifti(alice.get(f"/v1/jobs/{plain.json()['id']}/segmentation")).dataobj)
    np.testing.assert_array_equal(got, want)


def test_keys_with_a_common_prefix_and_no_owner_are_separate_tenants(
    deployment, api, phantom, worker
):
    # Each key without ':owner' is its own tenant (owners were once the key's first 6
    # characters, so these two shared one).
    a, b = api.client("hospital-a"), api.client("hospital-b")
    response = a.post("/v1/jobs", files=phantom.files())
    assert response.status_code == 202, response.text
    job = response.json()["id"]
    deployment.wait_state(a, job, ("succeeded",), timeout=120)
    assert job not in {j["id"] for j in b.get("/v1/jobs").json()["items"]}
    for path in ("", "/segmentation", "/metrics"):
        refused = b.get(f"/v1/jobs/{job}{path}")
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "job_not_found"
    assert b.delete(f"/v1/jobs/{job}").status_code == 404
    assert a.get(f"/v1/jobs/{job}/segmentation").status_code == 200
    assert job in {j["id"] for j in a.get("/v1/jobs").json()["items"]}


def _key_tree(value):
    """The keys of a JSON document, nested; values reduced to None."""
    if isinstance(value, dict):
        return {key: _key_tree(item) for key, item in value.items()}
    return None


def test_the_command_line_and_the_api_report_the_same_shape(
    deployment, api, phantom, submitted, worker, tiny_checkpoint, tmp_path
):
    """One case, once through ``omnet segment`` and once as a job: one report shape,
    key for key (paths differ: the API names files, the command line gives paths)."""
    from service.cli import main

    status = _succeeded(deployment, api, submitted.basic)  # the same case, with its reference
    served = api.client("alice").get(f"/v1/jobs/{submitted.basic}/metrics").json()

    folder = tmp_path / "case"
    folder.mkdir()
    for field, content in phantom.data.items():
        name = "seg" if field == "reference" else field
        (folder / f"case_{name}.nii.gz").write_bytes(content)
    out = tmp_path / "out"
    made = served["inference"]  # the same settings as the service's
    args = ["segment", str(folder), "--evaluate", "--preview", "--out", str(out)]
    args += ["--tiling", made["tiling"], "--postprocess", made["postprocess"]]
    args += ["--batch-size", str(made["batch_size"]), "--tta-mode", made["tta_mode"]]
    assert main([*args, "--checkpoint", str(tiny_checkpoint)]) == 0
    written = json.loads((out / "case_metrics.json").read_text())

    assert _key_tree(written) == _key_tree(served) == _key_tree(status["metrics"])
    assert written["report_version"] == served["report_version"] == 1
    assert written["volumes_ml"] == pytest.approx(served["volumes_ml"])
    regions = written["evaluation"]["metrics"]
    assert {r: m["dice"] for r, m in regions.items()} == pytest.approx(
        {r: m["dice"] for r, m in served["evaluation"]["metrics"].items()}
    )
    assert written["outputs"]["segmentation"] == str(out / "case_seg.nii.gz")
    assert served["outputs"]["segmentation"] == "segmentation.nii.gz"
