"""Real files through the real service: the NIfTI conformance corpus and a whole real
BraTS case with its header extensions, uploaded to ``omnet serve`` (uvicorn and its
embedded worker, the bundled model).

Each variant of ``tests/nifti_corpus.py`` is either segmented to the labels of the plain
file's job or refused with the 4xx code the command line gives it.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.io.nifti.files import find_case_files, find_label_file
from model.io.volumes import MODALITIES
from model.weights import BUNDLED_PATH
from tests.nifti_corpus import CLOSE_DICE, VARIANTS, CroppedCase, crop_real_case, dice
from tests.nifti_corpus import write_variant as write_corpus_variant
from tests.service.support import Api, Stack, base_env, wait_until
from tests.service.support import stack as make_stack

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Stack]:
    if not BUNDLED_PATH.is_file():
        pytest.skip("no bundled model in model/weights")
    env = base_env(BUNDLED_PATH, OMNET_TILING="wide")
    with make_stack("conformance", tmp_path_factory.mktemp("conformance"), env) as s:
        s.wait_api(s.start_serve())
        client = s.apis[0].client(None)
        wait_until(lambda: client.get("/readyz").status_code == 200, 120, "a worker", s, 0.5)
        yield s


@pytest.fixture(scope="module")
def api(deployment: Stack) -> Api:
    return deployment.apis[0]


def _upload(paths: dict[str, Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        (field, (path.name, path.read_bytes(), "application/octet-stream"))
        for field, path in paths.items()
    ]


@pytest.fixture(scope="module")
def submitted(brats_case_dir, api, tmp_path_factory) -> dict[str, dict]:
    """Every variant posted once (all before any is awaited): name -> answer."""
    case: CroppedCase = crop_real_case(brats_case_dir)
    folder = tmp_path_factory.mktemp("api-corpus")
    client = api.client("alice")
    answers = {}
    for variant in VARIANTS:
        paths = write_corpus_variant(case, variant, folder / variant.name)
        response = client.post("/v1/jobs", files=_upload(paths))
        assert response.status_code < 500, response.text
        answers[variant.name] = {"status": response.status_code, "body": response.json()}
    return answers


def _labels(client, job_id: str) -> np.ndarray:
    """The job's label map (NIfTI-1, or NIfTI-2 for a NIfTI-2 input: the input's format)."""
    seg = client.get(f"/v1/jobs/{job_id}/segmentation")
    assert seg.status_code == 200, seg.text
    raw = gzip.decompress(seg.content)
    klass = nib.Nifti2Image if int.from_bytes(raw[:4], "little") == 540 else nib.Nifti1Image
    return np.asarray(klass.from_bytes(raw).dataobj)


@pytest.fixture(scope="module")
def plain(submitted, deployment, api) -> np.ndarray:
    client = api.client("alice")
    answer = submitted["plain"]
    assert answer["status"] == 202, answer
    deployment.wait_state(client, answer["body"]["id"], ("succeeded",), timeout=300)
    labels = _labels(client, answer["body"]["id"])
    assert labels.any(), "the plain crop should hold tumour"
    return labels


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_each_variant_through_the_api(variant, submitted, plain, deployment, api):
    client = api.client("alice")
    answer = submitted[variant.name]
    if variant.expect not in ("same", "close"):
        assert 400 <= answer["status"] < 500
        assert answer["body"]["error"]["code"] == variant.expect
        return
    assert answer["status"] == 202, answer["body"]
    job_id = answer["body"]["id"]
    status = deployment.wait_state(client, job_id, ("succeeded",), timeout=300)
    assert status["metrics"]["evaluation"]["metrics"]["WT"]["dice"] is not None
    labels = _labels(client, job_id)
    if variant.expect == "same":
        np.testing.assert_array_equal(labels, plain)
    else:
        assert dice(labels, plain) >= CLOSE_DICE


def test_a_real_case_with_afni_extensions_is_scored(brats_case_dir, deployment, api):
    """The whole real case as the BraTS release ships it (AFNI XML header extension)."""
    files = find_case_files(brats_case_dir)
    assert nib.load(files["t1"]).header.extensions, "this case's files carry no extension"
    reference = find_label_file(brats_case_dir)
    assert reference is not None
    paths = {**{m: files[m] for m in MODALITIES}, "reference": reference}
    client = api.client("alice")
    response = client.post("/v1/jobs", files=_upload(paths))
    assert response.status_code == 202, response.text
    status = deployment.wait_state(client, response.json()["id"], ("succeeded",), timeout=600)
    scores = status["metrics"]["evaluation"]["metrics"]
    assert scores["WT"]["dice"] > 0.7, scores  # the bundled model on a real case
    quality = status["quality"]  # a good result on a real brain: nothing to review
    assert quality["review_recommended"] is False, quality
    assert 700 < quality["measures"]["brain_ml"] < 2200
