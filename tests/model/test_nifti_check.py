"""model/io/nifti/check.py: the command line's input rules, the voxels read in slabs."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.io.nifti import check as nifti_check
from model.io.nifti.check import check_case, check_labels
from model.io.nifti.read import inspect_case, load_case, load_labels
from model.io.volumes import MODALITIES, InputError

SHAPE = (64, 60, 48)


def _write_case(folder: Path, **replace: np.ndarray) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = {}
    for m in MODALITIES:
        data = replace.get(m, rng.integers(1, 500, SHAPE).astype(np.int16))
        paths[m] = folder / f"case_{m}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), paths[m])
    return paths


def _codes(paths: dict[str, Path]) -> tuple[str, str]:
    """What load_case and check_case say: 'ok' or the refusal code."""
    said = []
    for reader in (load_case, check_case):
        try:
            reader(paths)
            said.append("ok")
        except InputError as exc:
            said.append(exc.code)
    return said[0], said[1]


@pytest.fixture(autouse=True)
def _small_slabs(monkeypatch):
    monkeypatch.setattr(nifti_check, "SLAB_VOXELS", SHAPE[0] * SHAPE[1] * 5)  # 10 slabs


def test_a_good_case_passes_both(tmp_path):
    assert _codes(_write_case(tmp_path)) == ("ok", "ok")


@pytest.mark.parametrize(
    ("broken", "code"),
    [
        ("nan_in_last_slab", "non_finite"),
        ("inf_in_first_slab", "non_finite"),
        ("all_zero", "empty_volume"),
        ("zero_but_one_voxel", "ok"),
    ],
)
def test_value_rules_agree_with_the_whole_volume_reader(tmp_path, broken, code):
    data = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    if broken == "nan_in_last_slab":
        data[3, 4, -1] = np.nan
    elif broken == "inf_in_first_slab":
        data[0, 0, 0] = np.inf
    elif broken == "all_zero":
        data[:] = 0
    else:
        data[:] = 0
        data[10, 10, 47] = 1.0
    assert _codes(_write_case(tmp_path, t2=data)) == (code, code)


def test_a_truncated_file_is_unreadable_for_both(tmp_path):
    paths = _write_case(tmp_path)
    raw = gzip.decompress(paths["flair"].read_bytes())
    paths["flair"].write_bytes(gzip.compress(raw[: len(raw) // 2]))
    assert _codes(paths) == ("unreadable", "unreadable")


@pytest.mark.parametrize(
    ("labels", "code"),
    [
        (lambda a: a, "ok"),
        (lambda a: a.astype(np.float32), "ok"),
        (lambda a: np.where(a == 4, 3, a), "ok"),  # BraTS 2023's ET
        (lambda a: np.where(a == 1, 3, a), "bad_labels"),  # 3 and 4 together
        (lambda a: a.astype(np.float32) + 0.5 * (a == 2), "bad_labels"),
        (lambda a: np.where(a == 2, 7, a), "bad_labels"),
    ],
)
def test_label_rules_agree_with_the_whole_volume_reader(tmp_path, labels, code):
    paths = _write_case(tmp_path)
    base = np.zeros(SHAPE, np.uint8)
    base[10:20, 10:20, 5:40] = 2
    base[12:16, 12:16, 10:30] = 1
    base[13:15, 13:15, 30:45] = 4
    ref = tmp_path / "case_seg.nii.gz"
    nib.save(nib.Nifti1Image(labels(base), np.eye(4)), ref)
    said = []
    for check in (
        lambda: load_labels(ref, like=load_case(paths)),
        lambda: check_labels(ref, like=inspect_case(paths)),
    ):
        try:
            check()
            said.append("ok")
        except InputError as exc:
            said.append(exc.code)
    assert said == [code, code]


def test_checking_holds_a_slab_not_the_case(tmp_path):
    paths = _write_case(tmp_path)
    volume_bytes = int(np.prod(SHAPE)) * 4  # one modality as float32
    tracemalloc.start()
    try:
        check_case(paths)
        _, checked_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        load_case(paths)
        _, loaded_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loaded_peak > 4 * volume_bytes  # the reader holds the four volumes
    assert checked_peak < volume_bytes  # the checks never hold even one
