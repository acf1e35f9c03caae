"""service.client and ``omnet submit``: against a real ``omnet serve`` (tiny checkpoint,
the phantom case), and, for answers a real server gives only under faults (503 with
Retry-After, dropped connections), against httpx's mock transport."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from model.io.phantom import write_phantom
from service.client import ClientError, OmnetClient, WaitTimeoutError, case_files
from tests.service.conftest import SHAPE
from tests.service.support import API_KEYS, OMNET, Api, Stack, base_env
from tests.service.support import stack as make_stack

JOB = "6f1c0c4e-0d5e-4c43-9a57-0e7c7f4b2f11"


# --------------------------------------------------------------------------- fakes
def _status(state: str, progress: float = 0.0) -> dict:
    return {
        "id": JOB,
        "state": state,
        "progress": progress,
        "created_at": "2026-01-01T00:00:00",
        "attempts": 1,
        "options": {},
        "links": {"self": f"http://omnet.test/v1/jobs/{JOB}"},
    }


def _created() -> dict:
    return {
        "id": JOB,
        "state": "queued",
        "status_url": f"http://omnet.test/v1/jobs/{JOB}",
        "queue_position": 1,
        "created_at": "2026-01-01T00:00:00",
    }


def _busy(retry_after: str | None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"code": "database_unavailable", "message": "try again"}}
    return httpx.Response(503, json=body, headers=headers)


def _client(handler, sleeps: list[float], **kwargs) -> OmnetClient:
    return OmnetClient(
        "http://omnet.test",
        "k1",
        transport=httpx.MockTransport(handler),
        sleep=sleeps.append,
        **kwargs,
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    paths = write_phantom(tmp_path_factory.mktemp("client-case"), name="case", shape=SHAPE, seed=3)
    return paths["t1"].parent


# --------------------------------------------------------------------------- retries
def test_a_submission_retried_after_503_keeps_its_idempotency_key(case: Path) -> None:
    seen: list[httpx.Request] = []
    answers = [_busy("2"), _busy(None), httpx.Response(202, json=_created())]

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answers.pop(0)

    sleeps: list[float] = []
    with _client(handler, sleeps) as client:
        created = client.submit(case, {"preview": False, "label_convention": 3})
    assert created.id == JOB
    assert sleeps == [2.0, 2.0]  # Retry-After, then the back-off of a second retry
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(keys) == 1 and len(seen) == 3
    assert {r.headers["X-API-Key"] for r in seen} == {"k1"}
    bodies = [r.content for r in seen]
    assert len(set(map(len, bodies))) == 1  # the whole files again on each attempt
    for name in (b'name="t1"', b'name="flair"', b'name="preview"\r\n\r\nfalse', b"\r\n\r\n3\r\n"):
        assert name in bodies[2], name


def test_retry_after_as_a_date_is_capped_and_retries_run_out() -> None:
    later = format_datetime(datetime.now(timezone.utc) + timedelta(hours=1), usegmt=True)
    sleeps: list[float] = []
    client = _client(lambda _r: _busy(later), sleeps, retries=2, max_retry_wait_s=7)
    with client, pytest.raises(ClientError) as caught:
        client.status(JOB)
    assert sleeps == [7, 7]
    assert caught.value.status == 503 and caught.value.code == "database_unavailable"


def test_dropped_connections_are_retried_and_4xx_are_not() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/missing"):
            body = {"error": {"code": "job_not_found", "message": "no job missing"}}
            return httpx.Response(404, json=body)
        return httpx.Response(200, json=_status("running", 0.5))

    sleeps: list[float] = []
    with _client(handler, sleeps) as client:
        assert client.status(JOB).progress == 0.5
        with pytest.raises(ClientError) as caught:
            client.status("missing")
    assert sleeps == [1.0] and len(calls) == 3
    assert (caught.value.status, caught.value.code) == (404, "job_not_found")


def test_wait_backs_off_and_gives_up_after_its_timeout() -> None:
    states = iter(["queued", "running", "running", "succeeded"])
    sleeps: list[float] = []
    handler = lambda _r: httpx.Response(200, json=_status(next(states)))  # noqa: E731
    with _client(handler, sleeps) as client:
        seen = []
        final = client.wait(JOB, poll_s=1.0, max_poll_s=2.0, on_status=seen.append)
    assert final.state == "succeeded"
    assert sleeps == [1.0, 1.5, 2.0]
    assert [s.state for s in seen] == ["queued", "running", "running", "succeeded"]

    client = _client(lambda _r: httpx.Response(200, json=_status("queued")), [])
    with client, pytest.raises(WaitTimeoutError, match="still queued"):
        client.wait(JOB, timeout_s=0.5, poll_s=1.0)


def test_case_files_tell_what_is_sent(case: Path, tmp_path: Path) -> None:
    assert [f for f, _ in case_files(case)] == ["t1", "t1ce", "t2", "flair"]
    study = tmp_path / "study.zip"
    study.write_bytes(b"PK\x05\x06" + bytes(18))
    assert case_files(study) == [("study", study)]
    assert case_files(case / "case_t1.nii.gz") == [("image", case / "case_t1.nii.gz")]
    dicom = tmp_path / "dicom"
    (dicom / "series").mkdir(parents=True)
    (dicom / "series" / "1.dcm").write_bytes(b"x")
    assert case_files(dicom) == [("dicom", dicom / "series" / "1.dcm")]
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "x_t1.nii.gz").write_bytes((case / "case_t1.nii.gz").read_bytes())
    with pytest.raises(ClientError) as caught:
        case_files(incomplete)
    assert caught.value.code == "missing_modality" and caught.value.status == 0
    with pytest.raises(ClientError, match="does not exist"):
        case_files(tmp_path / "nothing")


# --------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_checkpoint) -> Iterator[Stack]:
    with make_stack("client", tmp_path_factory.mktemp("client"), base_env(tiny_checkpoint)) as s:
        s.wait_api(s.start_serve())
        yield s


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    return deployment.apis[0]


def test_submit_wait_download_against_omnet_serve(api: Api, case: Path, tmp_path: Path) -> None:
    with OmnetClient(api.url, API_KEYS["alice"]) as client:
        created = client.submit(case, {"probabilities": True})
        status = client.wait(created.id, timeout_s=180, poll_s=0.2)
        assert status.state == "succeeded", status
        files = client.download(status, tmp_path / "out")
        assert client.jobs().items[0].id == created.id
    names = {kind: path.name for kind, path in files.items()}
    assert names == {
        "segmentation": "segmentation.nii.gz",
        "probabilities": "probabilities.nii.gz",
        "metrics": "metrics.json",
        "preview": "preview.png",
    }
    labels = np.asarray(nib.load(files["segmentation"]).dataobj)
    assert labels.shape == SHAPE
    assert json.loads(files["metrics"].read_text())["shape"] == list(SHAPE)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]

    with OmnetClient(api.url, API_KEYS["bob"]) as other, pytest.raises(ClientError) as caught:
        other.status(created.id)
    assert caught.value.code == "job_not_found"


def _omnet(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "OMNET_API_KEY": key or ""}
    return subprocess.run(
        [*OMNET, *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def test_omnet_submit_waits_and_downloads(api: Api, case: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _omnet("submit", "--server", api.url, str(case), "--wait", "--out", str(out), key="k1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    job_id = lines[0]
    assert f"job {job_id}: succeeded" in done.stderr
    assert str(out / "segmentation.nii.gz") in lines[1:]
    assert (out / "metrics.json").is_file() and (out / "preview.png").is_file()
    assert api.client("alice").get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"

    queued = _omnet("submit", "--server", api.url, str(case), "--no-preview", key="k1")
    assert queued.returncode == 0 and len(queued.stdout.split()) == 1  # just the id

    refused = _omnet("submit", "--server", api.url, str(case), key="wrong")
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("omnet submit: error: invalid_api_key:")
    assert len(refused.stderr.strip().splitlines()) == 1

    missing = _omnet("submit", "--server", api.url, str(tmp_path / "nothing"), key="k1")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
