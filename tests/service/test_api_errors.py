"""Bad requests are answered 4xx with a JSON error code, and nothing is queued.

One real API process (uvicorn) on Redis, with small limits (2 MB requests, 8 MB
volumes) and no worker, so every accepted job would stay visible in the Redis queue.
Each test compares the jobs, queued messages and stored folders after its requests with
those before, so the tests pass in any order.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from service.uploads import FILE_FIELDS, OPTION_FIELDS
from tests.service.support import (
    Api,
    Phantom,
    Stack,
    nifti_gz,
    queued_messages,
    redis_env,
    wait_until,
)
from tests.service.support import stack as make_stack

MAX_UPLOAD_MB = 2
MAX_VOLUME_MB = 8
IDLE_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, redis_url, queue_prefix, tiny_checkpoint) -> Iterator[Stack]:
    env = redis_env(
        redis_url,
        f"{queue_prefix}-errors",
        tiny_checkpoint,
        OMNET_MAX_UPLOAD_MB=str(MAX_UPLOAD_MB),
        OMNET_MAX_VOLUME_MB=str(MAX_VOLUME_MB),
        OMNET_UPLOAD_IDLE_TIMEOUT_S=str(IDLE_TIMEOUT_S),
    )
    with make_stack("errors", tmp_path_factory.mktemp("errors"), env) as s:
        s.wait_api(s.start_api())
        yield s


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    return deployment.apis[0]


@pytest.fixture(scope="module")
def queue(queue_prefix: str) -> str:
    return f"{queue_prefix}-errors.cpu"


def _queued(deployment: Stack, api: Api, redis_url: str, queue: str) -> dict[str, Any]:
    """Everything a submission leaves behind: jobs, queued messages and stored folders."""
    seen: dict[str, Any] = {}
    for owner in ("alice", "bob"):
        listing = api.client(owner).get("/v1/jobs")
        assert listing.status_code == 200
        seen[f"{owner}'s jobs"] = listing.json()["total"]
    seen["queued messages"] = queued_messages(redis_url, queue)
    jobs = deployment.storage / "jobs"
    seen["job folders"] = sorted(p.name for p in jobs.iterdir()) if jobs.exists() else []
    staging = deployment.storage / "staging"
    seen["uploads in staging"] = (
        sorted(p.name for p in staging.iterdir()) if staging.exists() else []
    )
    return seen


@pytest.fixture
def assert_nothing_queued(deployment, api, redis_url, queue) -> Callable[[], None]:
    """A check that the test's requests queued and stored nothing (from here on)."""
    before = _queued(deployment, api, redis_url, queue)

    def check() -> None:
        assert _queued(deployment, api, redis_url, queue) == before

    return check


# --------------------------------------------------------------------------- bad inputs
def _header_only(
    shape: tuple[int, ...], dtype: type = np.int16, extra: int = 1024, bz: bool = False
) -> bytes:
    """A NIfTI header declaring ``shape``, followed by ``extra`` zero bytes, compressed."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\0" * extra
    return bz2.compress(raw) if bz else gzip.compress(raw)


def _as_bz2(gz: bytes) -> bytes:
    return bz2.compress(gzip.decompress(gz))


def _with_values(ph: Phantom, field_name: str, edit: Callable[[np.ndarray], np.ndarray]) -> bytes:
    if field_name == "reference":
        return nifti_gz(edit(ph.labels.copy()), ph.affine)
    return nifti_gz(edit(ph.images[field_name].astype(np.float32)), ph.affine)


def _nan(volume: np.ndarray) -> np.ndarray:
    volume[10, 10, 10] = np.nan
    return volume


def _bad_label(labels: np.ndarray) -> np.ndarray:
    labels[labels == 2] = 7
    return labels


def _corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return (
        data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 512]) + data[middle + 512 :]
    )


@dataclass
class Bad:
    """A bad request: how to build it and the answer it must get."""

    name: str
    status: int
    code: str
    files: Callable[[Phantom], list[Any]]
    data: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _files(**replace: tuple[str, bytes] | None) -> Callable[[Phantom], list[Any]]:
    return lambda ph: ph.files(with_reference=True, **replace)


def _dynamic(
    make: Callable[[Phantom], dict[str, tuple[str, bytes] | None]],
) -> Callable[[Phantom], list[Any]]:
    return lambda ph: ph.files(with_reference=True, **make(ph))


TEXT = b"patient_id,age\n123,45\n" * 20
BAD = [
    Bad("missing_modality", 400, "missing_modality", _files(flair=None)),
    Bad("text_named_nii_gz", 400, "not_nifti", _files(t1=("t1.nii.gz", TEXT))),
    Bad("text_named_nii", 400, "not_nifti", _files(t1=("t1.nii", TEXT))),
    Bad(
        "not_a_nifti_name", 400, "not_nifti", _dynamic(lambda ph: {"t1": ("t1.png", ph.data["t1"])})
    ),
    Bad("reference_not_nifti", 400, "not_nifti", _files(reference=("seg.nii.gz", TEXT))),
    Bad("empty_file", 400, "empty_file", _files(t2=("t2.nii.gz", b""))),
    Bad(
        "corrupt_gzip",
        400,
        "corrupt_gzip",
        _dynamic(lambda ph: {"t1": ("t1.nii.gz", _corrupt(ph.data["t1"]))}),
    ),
    Bad(
        "truncated_gzip",
        400,
        "corrupt_gzip",
        _dynamic(
            lambda ph: {"t1ce": ("t1ce.nii.gz", ph.data["t1ce"][: len(ph.data["t1ce"]) // 2])}
        ),
    ),
    Bad(
        "decompression_bomb_without_a_header",
        400,
        "not_nifti",
        _files(flair=("flair.nii.gz", gzip.compress(b"\0" * (3 * MAX_VOLUME_MB // 2 * 2**20)))),
    ),
    Bad(
        "decompression_bomb_behind_a_small_header",
        400,
        "not_nifti",
        _files(t2=("t2.nii.gz", _header_only((10, 10, 10), extra=3 * MAX_VOLUME_MB // 2 * 2**20))),
    ),
    Bad(
        "bzip2_bomb_behind_a_small_header",
        400,
        "not_nifti",
        _files(
            t2=("t2.nii.bz2", _header_only((10, 10, 10), extra=3 * MAX_VOLUME_MB * 2**20, bz=True))
        ),
    ),
    Bad(
        "corrupt_bzip2",
        400,
        "corrupt_bzip2",
        _dynamic(lambda ph: {"t1": ("t1.nii.bz2", _corrupt(_as_bz2(ph.data["t1"])))}),
    ),
    Bad(
        "truncated_bzip2",
        400,
        "corrupt_bzip2",
        _dynamic(lambda ph: {"t1": ("t1.nii.bz2", _as_bz2(ph.data["t1"])[:-40])}),
    ),
    Bad(
        "gzip_named_bz2",
        400,
        "not_nifti",
        _dynamic(lambda ph: {"t1": ("t1.nii.bz2", ph.data["t1"])}),
    ),
    Bad(
        "declared_huge_volume",
        413,
        "volume_too_large",
        _files(t1=("t1.nii.gz", _header_only((1024, 1024, 1024)))),
    ),
    Bad(
        "upload_too_large",
        413,
        "upload_too_large",
        _files(t1=("t1.nii.gz", os.urandom((MAX_UPLOAD_MB + 1) * 2**20))),
    ),
    Bad(
        "complex_volume",
        422,
        "unsupported_dtype",
        _dynamic(
            lambda ph: {
                "t1": ("t1.nii.gz", nifti_gz(ph.images["t1"].astype(np.complex64), ph.affine))
            }
        ),
    ),
    Bad(
        "shape_mismatch",
        422,
        "shape_mismatch",
        _dynamic(
            lambda ph: {"t2": ("t2.nii.gz", nifti_gz(ph.images["t2"][:, :, :-2].copy(), ph.affine))}
        ),
    ),
    Bad(
        "affine_mismatch",
        422,
        "affine_mismatch",
        _dynamic(
            lambda ph: {"t2": ("t2.nii.gz", nifti_gz(ph.images["t2"], ph.affine + _shift(5.0)))}
        ),
    ),
    Bad(
        "not_3d",
        422,
        "not_3d",
        _dynamic(
            lambda ph: {
                "t1": ("t1.nii.gz", nifti_gz(np.stack([ph.images["t1"]] * 2, axis=-1), ph.affine))
            }
        ),
    ),
    Bad(
        "one_slice_case",  # 48 x 48 x 1: "succeeded" with nothing segmented
        422,
        "too_small",
        _dynamic(
            lambda ph: (
                {
                    m: (f"{m}.nii.gz", nifti_gz(ph.images[m][:, :, 16:17].copy(), ph.affine))
                    for m in ("t1", "t1ce", "t2", "flair")
                }
                | {"reference": None}
            )
        ),
    ),
    Bad(
        "thin_4d_image",
        422,
        "too_small",
        _dynamic(
            lambda ph: (
                {m: None for m in ("t1", "t1ce", "t2", "flair", "reference")}
                | {
                    "image": (
                        "image.nii.gz",
                        nifti_gz(
                            np.stack(
                                [ph.images[m][:, 17:32] for m in ("t1", "t1ce", "t2", "flair")], -1
                            ),
                            ph.affine,
                        ),
                    )
                }
            )
        ),
    ),
    Bad(
        "non_finite",
        422,
        "non_finite",
        _dynamic(lambda ph: {"t1": ("t1.nii.gz", _with_values(ph, "t1", _nan))}),
    ),
    Bad(
        "empty_volume",
        422,
        "empty_volume",
        _dynamic(lambda ph: {"flair": ("flair.nii.gz", _with_values(ph, "flair", np.zeros_like))}),
    ),
    Bad(
        "bad_labels",
        422,
        "bad_labels",
        _dynamic(
            lambda ph: {"reference": ("seg.nii.gz", _with_values(ph, "reference", _bad_label))}
        ),
    ),
    Bad(
        "reference_shape_mismatch",
        422,
        "shape_mismatch",
        _dynamic(
            lambda ph: {"reference": ("seg.nii.gz", nifti_gz(ph.labels[:-1].copy(), ph.affine))}
        ),
    ),
    Bad("unknown_option", 400, "unknown_option", _files(), data={"colour": "red"}),
    Bad(
        "unknown_file_field",
        400,
        "unknown_option",
        _dynamic(lambda ph: {"t1_extra": ("x.nii.gz", ph.data["t1"])}),
    ),
    Bad("bad_bool_option", 400, "bad_option", _files(), data={"postprocess": "maybe"}),
    Bad("bad_label_convention", 400, "bad_option", _files(), data={"label_convention": "5"}),
    Bad("option_sent_as_file", 400, "bad_option", _files(preview=("preview.txt", b"true"))),
    Bad("file_sent_as_value", 400, "missing_file", _files(t1=None), data={"t1": "t1.nii.gz"}),
    Bad(
        "dot_dot_filename",
        400,
        "bad_filename",
        _dynamic(lambda ph: {"t1": ("../t1.nii.gz", ph.data["t1"])}),
    ),
    Bad(
        "absolute_filename",
        400,
        "bad_filename",
        _dynamic(lambda ph: {"t2": ("/etc/t2.nii.gz", ph.data["t2"])}),
    ),
    Bad(
        "backslash_filename",
        400,
        "bad_filename",
        _dynamic(lambda ph: {"flair": ("..\\flair.nii.gz", ph.data["flair"])}),
    ),
    Bad(
        "hidden_filename",
        400,
        "bad_filename",
        _dynamic(lambda ph: {"t1ce": (".t1ce.nii.gz", ph.data["t1ce"])}),
    ),
    Bad(
        "image_and_modalities",
        400,
        "conflicting_inputs",
        _dynamic(lambda ph: {"image": ("image.nii.gz", ph.data["t1"])}),
    ),
    Bad(
        "long_idempotency_key",
        400,
        "bad_idempotency_key",
        _files(),
        headers={"Idempotency-Key": "x" * 201},
    ),
]


def _shift(mm: float) -> np.ndarray:
    shift = np.zeros((4, 4))
    shift[0, 3] = mm
    return shift


@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_bad_upload_is_refused_and_nothing_queued(bad, api, phantom, assert_nothing_queued):
    _assert_refused(api, phantom, bad)
    assert_nothing_queued()


def _assert_refused(api: Api, phantom: Phantom, bad: Bad) -> None:
    client = api.client("alice", **bad.headers)
    response = client.post("/v1/jobs", files=bad.files(phantom), data=bad.data)
    assert response.status_code == bad.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == bad.code, error
    assert len(error["message"]) > 10


def _multipart(fields: list[tuple[str, str, bytes]], boundary: str) -> list[bytes]:
    parts = []
    for name, filename, data in fields:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/gzip\r\n\r\n'
        )
        parts += [head.encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return parts


def test_streamed_upload_over_limit_without_length(api, phantom, assert_nothing_queued):
    """A chunked body (no Content-Length) is counted as it arrives and refused."""
    boundary = "omnet-test-boundary"
    fields = [(m, f"{m}.nii.gz", phantom.data[m]) for m in ("t1ce", "t2", "flair")]
    fields.append(("t1", "t1.nii.gz", os.urandom((MAX_UPLOAD_MB + 1) * 2**20)))
    parts = _multipart(fields, boundary)

    def chunks() -> Iterator[bytes]:
        for part in parts:
            for start in range(0, len(part), 64 * 1024):
                yield part[start : start + 64 * 1024]

    client = api.client("alice", **{"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = client.post("/v1/jobs", content=chunks())
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "upload_too_large"
    assert_nothing_queued()


@pytest.mark.parametrize(
    ("owner_key", "code"), [(None, "missing_api_key"), ("not-a-key", "invalid_api_key")]
)
def test_submit_without_valid_key_is_401(owner_key, code, api, phantom, assert_nothing_queued):
    client = api.client(None, **({"X-API-Key": owner_key} if owner_key else {}))
    response = client.post("/v1/jobs", files=phantom.files())
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == code
    assert response.headers["www-authenticate"] == "ApiKey"  # RFC 9110: every 401 has one
    for path in ("/v1/jobs", "/v1/model", f"/v1/jobs/{'0' * 36}"):
        answer = client.get(path)
        assert (answer.status_code, answer.json()["error"]["code"]) == (401, code), path
    assert_nothing_queued()


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"t1": "t1.nii.gz"}}, 415, "not_multipart"),
        ({"data": {"postprocess": "true"}}, 415, "not_multipart"),
        ({"content": b"\x1f\x8b" + b"\0" * 64}, 415, "not_multipart"),
        (
            {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
            400,
            "bad_multipart",
        ),
        (
            {"files": [("postprocess", (None, b"true"))] * 20},
            400,
            "bad_multipart",
        ),
    ],
    ids=["json", "urlencoded", "raw", "no_boundary", "too_many_fields"],
)
def test_malformed_bodies(kwargs, status, code, api, assert_nothing_queued):
    response = api.client("alice").post("/v1/jobs", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert_nothing_queued()


def _answered(api: Api) -> dict[str, float]:
    """Requests the API process has answered, by "METHOD route status" (its metrics)."""
    text = api.client(None).get("/metrics").text
    pattern = r'^omnet_http_requests_total\{method="(\w+)",route="([^"]*)",status="(\d+)"\} (\S+)$'
    return {
        f"{method} {route} {status}": float(n)
        for method, route, status, n in re.findall(pattern, text, re.MULTILINE)
    }


def _posts_answered(api: Api, status: int) -> float:
    return _answered(api).get(f"POST /v1/jobs {status}", 0.0)


def test_upload_cut_short_is_not_a_server_error(api, deployment, assert_nothing_queued):
    """The client closes the connection in the middle of its body."""
    before = _posts_answered(api, 400)
    head = (
        b'--b\r\nContent-Disposition: form-data; name="t1"; filename="t1.nii.gz"\r\n'
        b"Content-Type: application/gzip\r\n\r\n" + b"\x1f\x8b" + b"x" * 5000
    )
    host, port = api.url.removeprefix("http://").split(":")
    request = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nX-API-Key: k1\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request + head)
        time.sleep(0.3)
    wait_until(
        lambda: _posts_answered(api, 400) == before + 1,
        10,
        "the cut-short upload to be answered 400",
        deployment,
    )
    assert_nothing_queued()


def test_a_stalled_upload_is_answered_408_and_closed(api, assert_nothing_queued):
    """The client declares a large body, sends a little of it and stops."""
    host, port = api.url.removeprefix("http://").split(":")
    request = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nX-API-Key: k1\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        b'--b\r\nContent-Disposition: form-data; name="t1"; filename="t1.nii.gz"\r\n\r\n'
    )
    with socket.create_connection((host, int(port)), timeout=IDLE_TIMEOUT_S + 10) as sock:
        sock.sendall(request)
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):  # the server answers, then closes
            answer += chunk
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"upload_stalled"' in answer
    assert IDLE_TIMEOUT_S - 0.5 <= waited < IDLE_TIMEOUT_S + 8
    assert_nothing_queued()


def test_control_a_good_upload_is_queued(api, phantom, deployment, redis_url, queue):
    """The same instance accepts a normal case: the checks above could have seen a job."""
    before = _queued(deployment, api, redis_url, queue)
    client = api.client("alice")
    response = client.post(
        "/v1/jobs",
        files=phantom.files(with_reference=True),
        data={"label_convention": "3", "probabilities": "yes", "preview": "0"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "queued"
    after = _queued(deployment, api, redis_url, queue)
    assert after == {
        **before,
        "alice's jobs": before["alice's jobs"] + 1,
        "queued messages": before["queued messages"] + 1,
        "job folders": sorted([*before["job folders"], response.json()["id"]]),
    }


def test_an_idempotency_key_reused_for_another_submission_is_refused(
    api, phantom, deployment, redis_url, queue
):
    """The key's first submission is queued; the same key with other options, or other
    files, is answered 422 and queues and stores nothing; the first body again gets
    the first job."""
    client = api.client("alice", **{"Idempotency-Key": f"reused-{time.monotonic_ns()}"})
    first = client.post("/v1/jobs", files=phantom.files(), data={"preview": "false"})
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    before = _queued(deployment, api, redis_url, queue)
    other_files = phantom.files(with_reference=True)
    for files, data in ((phantom.files(), {"preview": "true"}), (other_files, {"preview": "0"})):
        response = client.post("/v1/jobs", files=files, data=data)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "idempotency_key_reused", error
        assert job_id in error["message"] and "new Idempotency-Key" in error["message"]
    again = client.post("/v1/jobs", files=phantom.files(), data={"preview": "no"})
    assert again.status_code == 202 and again.json()["id"] == job_id, again.text
    assert _queued(deployment, api, redis_url, queue) == before


def test_no_request_was_answered_500(api, phantom):
    """The API's own count of answers: no 5xx, also for requests whose answer no test
    client saw; and its bad requests were counted under their 4xx status."""
    named = {bad.name: bad for bad in BAD}
    by_status = {
        400: named["missing_modality"],
        413: named["declared_huge_volume"],
        422: named["shape_mismatch"],
    }
    before = _answered(api)
    for bad in by_status.values():
        _assert_refused(api, phantom, bad)
    after = _answered(api)
    for status in by_status:
        key = f"POST /v1/jobs {status}"
        assert after.get(key, 0.0) == before.get(key, 0.0) + 1, (key, after)
    assert not [k for k in after if k.split()[-1].startswith("5")], after


# ------------------------------------------------------------- multipart edge cases
BOUNDARY = "omnet-edge-boundary"


def _raw_form(parts: list[tuple[str, bytes]], closed: bool = True) -> bytes:
    """A multipart body by hand: each part's Content-Disposition parameters after
    ``form-data; `` and its content; ``closed=False`` leaves out the closing boundary."""
    body = b""
    for disposition, data in parts:
        body += (
            (
                f"--{BOUNDARY}\r\nContent-Disposition: form-data; {disposition}\r\n"
                "Content-Type: application/gzip\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + (f"--{BOUNDARY}--\r\n".encode() if closed else b"")


def _post_raw(api: Api, body: bytes) -> Any:
    client = api.client("alice", **{"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    response = client.post("/v1/jobs", content=body)
    assert response.request.headers["content-length"] == str(len(body))
    return response


def _modalities(phantom: Phantom, **disposition: str) -> list[tuple[str, bytes]]:
    """The four modalities as parts; ``disposition={field: params}`` replaces the
    ``name=...; filename=...`` parameters of a part."""
    return [
        (disposition.get(m, f'name="{m}"; filename="{m}.nii.gz"'), phantom.data[m])
        for m in ("t1", "t1ce", "t2", "flair")
    ]


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda body: body[: len(body) // 2], id="in_a_file"),
        pytest.param(lambda body: body[: body.rindex(b"\r\n--")], id="before_the_last_boundary"),
        pytest.param(lambda body: body, id="no_closing_boundary"),
    ],
)
def test_a_truncated_body_is_upload_incomplete(cut, api, phantom, assert_nothing_queued):
    """A body that ends (Content-Length and all) before its closing boundary was cut
    short: it is not a case with a modality missing."""
    body = cut(_raw_form(_modalities(phantom), closed=False))
    response = _post_raw(api, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "upload_incomplete", error
    assert (
        "closing boundary" in error["message"]
        and "send the whole request again" in (error["message"])
    )
    assert_nothing_queued()


def test_a_closed_body_missing_a_part_is_still_missing_modality(api, phantom):
    """The control: a complete body without flair is a missing modality."""
    response = _post_raw(api, _raw_form(_modalities(phantom)[:3]))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "missing_modality"


def test_rfc5987_file_names_are_file_uploads(api, phantom, deployment, redis_url, queue):
    """``filename*=UTF-8''...`` (no plain filename) names a file upload, decoded."""
    before = _queued(deployment, api, redis_url, queue)
    parts = _modalities(
        phantom,
        t1="name=\"t1\"; filename*=UTF-8''%C3%A9chantillon_t1.nii.gz",
        flair="name=\"flair\"; filename*=utf-8'en'flair.nii.gz",
    )
    response = _post_raw(api, _raw_form(parts))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    after = _queued(deployment, api, redis_url, queue)
    assert after["queued messages"] == before["queued messages"] + 1
    assert job_id in after["job folders"]
    stored = sorted(p.name for p in (deployment.job_dir(job_id) / "inputs").iterdir())
    assert stored == ["flair.nii.gz", "t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz"]


@pytest.mark.parametrize(
    ("disposition", "code", "shown"),
    [
        ("name=\"t1\"; filename*=UTF-8''..%2Ft1.nii.gz", "bad_filename", "'../t1.nii.gz'"),
        ("name=\"t1\"; filename*=UTF-8''t1.png", "not_nifti", "'t1.png'"),
        ("name=\"t1\"; filename*=UTF-8''", "bad_filename", "no file name"),
        ("name=\"preview\"; filename*=UTF-8''preview.txt", "bad_option", "not a file"),
    ],
    ids=["path", "not_nifti", "empty", "option_as_file"],
)
def test_rfc5987_file_names_are_checked(
    disposition, code, shown, api, phantom, assert_nothing_queued
):
    """The decoded name goes through the same checks as a plain one."""
    field = disposition.split('"')[1]
    parts = _modalities(phantom, **({field: disposition} if field == "t1" else {}))
    if field != "t1":
        parts.append((disposition, b"true"))
    response = _post_raw(api, _raw_form(parts))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert shown in error["message"], error
    assert_nothing_queued()


def test_openapi_describes_the_submission_form(api):
    """/openapi.json (and so /docs) has the multipart body of POST /v1/jobs: every file
    field as a binary upload and every job option."""
    spec = api.client(None).get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]
    assert body["required"] is True
    schema = body["content"]["multipart/form-data"]["schema"]
    properties = schema["properties"]
    assert list(properties) == [*FILE_FIELDS, *OPTION_FIELDS]
    assert list(FILE_FIELDS) == [
        "t1",
        "t1ce",
        "t2",
        "flair",
        "image",
        "reference",
        "study",
        "dicom",
    ]
    assert list(OPTION_FIELDS) == [
        "postprocess",
        "label_convention",
        "probabilities",
        "preview",
        "callback_url",
        "study_uid",
        "series",
        "destinations",
    ]
    for name in FILE_FIELDS:
        field = properties[name]["items"] if name == "dicom" else properties[name]
        assert field["type"] == "string" and field["format"] == "binary"
    assert properties["dicom"]["type"] == "array"  # repeated: one part per file
    assert properties["postprocess"]["type"] == "boolean"
    assert properties["postprocess"]["default"] is True
    assert properties["label_convention"]["enum"] == [4, 3]
