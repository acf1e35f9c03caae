"""The NIfTI conformance corpus (``tests/nifti_corpus.py``) through the command line's
reader and the API's submission checks: one input path.

Every variant of a real BraTS case is accepted by both or refused by both with the same
code, and an accepted variant segments (``omnet segment``, in process) to the plain
file's labels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from starlette.datastructures import UploadFile

from model.io.nifti.read import load_case, load_labels
from model.io.volumes import MODALITIES, InputError
from service.cli import main as omnet
from service.errors import ApiError
from service.nifti_uploads import store_case
from tests.nifti_corpus import CLOSE_DICE, VARIANTS, CroppedCase, Variant, crop_real_case, dice
from tests.nifti_corpus import write_variant as write_corpus_variant

pytestmark = pytest.mark.data

MAX_VOLUME = 1 << 30


@pytest.fixture(scope="module")
def real_case(brats_case_dir: Path) -> CroppedCase:
    return crop_real_case(brats_case_dir)


@pytest.fixture(scope="module")
def corpus(real_case: CroppedCase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nifti-corpus")


def _files(real_case: CroppedCase, corpus: Path, variant: Variant) -> dict[str, Path]:
    folder = corpus / variant.name
    if folder.exists():
        shutil.rmtree(folder)
    return write_corpus_variant(real_case, variant, folder)


def cli_reader(paths: dict[str, Path]) -> str:
    """What the command line's reader says of the files: 'ok' or the refusal code."""
    try:
        case = load_case({m: paths[m] for m in MODALITIES})
        load_labels(paths["reference"], like=case)
    except InputError as exc:
        return exc.code
    return "ok"


def api_checks(paths: dict[str, Path], staging: Path) -> tuple[str, int, str]:
    """What the API's submission checks say: ('ok', 202, '') or (code, status, message)."""
    staging.mkdir(parents=True, exist_ok=True)
    handles = {f: open(p, "rb") for f, p in paths.items()}  # noqa: SIM115
    try:
        uploads = {f: UploadFile(h, filename=paths[f].name) for f, h in handles.items()}
        store_case(uploads, staging, MAX_VOLUME)
    except ApiError as exc:
        return exc.code, exc.status, exc.message
    finally:
        for h in handles.values():
            h.close()
    return "ok", 202, ""


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_the_api_and_the_command_line_accept_the_same_files(variant, real_case, corpus, tmp_path):
    paths = _files(real_case, corpus, variant)
    cli = cli_reader(paths)
    api, status, message = api_checks(paths, tmp_path / "staging")
    assert cli == api, f"command line says {cli}, API says {api} ({message})"
    expected = "ok" if variant.expect in ("same", "close") else variant.expect
    assert cli == expected
    if api != "ok":
        assert 400 <= status < 500
        assert "Error" not in message, message  # no exception class names for people
        assert "convert" in message or "send" in message, message


@pytest.fixture(scope="module")
def plain_labels(real_case: CroppedCase, corpus: Path) -> np.ndarray:
    plain = next(v for v in VARIANTS if v.name == "plain")
    return _segment(_files(real_case, corpus, plain), corpus / "plain-out")


def _segment(paths: dict[str, Path], out: Path) -> np.ndarray:
    args = [f"--{m}={paths[m]}" for m in MODALITIES]
    assert omnet(["segment", *args, "--out", str(out)]) == 0
    (result,) = out.glob("*_seg.nii.gz")
    return np.asarray(nib.load(result).dataobj)


#: Accepted variants whose images differ from the plain file's (the label-map variants
#: share its images; the parity test above reads their references).
ACCEPTED = [
    v for v in VARIANTS if v.expect in ("same", "close") and v.name != "plain" and v.labels is None
]


@pytest.mark.parametrize("variant", ACCEPTED, ids=lambda v: v.name)
def test_every_accepted_variant_segments_like_the_plain_file(
    variant, real_case, corpus, plain_labels
):
    paths = _files(real_case, corpus, variant)
    labels = _segment(paths, corpus / f"{variant.name}-out")
    assert labels.shape == plain_labels.shape
    assert plain_labels.any(), "the plain crop should hold tumour"
    if variant.expect == "same":
        np.testing.assert_array_equal(labels, plain_labels)
    else:  # 8-bit voxels cannot hold the intensities: nibabel scales them
        assert dice(labels, plain_labels) >= CLOSE_DICE
