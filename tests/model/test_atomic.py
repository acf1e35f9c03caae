"""Tests for model/atomic.py: whole files or none, normal permissions, no leftovers."""

from __future__ import annotations

import os
import stat

import pytest

from model.atomic import atomic_write, atomic_write_text


def test_writes_through_a_temporary_file_with_the_same_suffix(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert not (tmp_path / "a" / "x.nii.gz").exists()  # not under its name yet
        tmp.write_bytes(b"data")

    out = atomic_write(tmp_path / "a" / "x.nii.gz", write)
    assert out.read_bytes() == b"data"
    assert seen[0].name.endswith(".nii.gz") and seen[0].parent == out.parent
    assert os.listdir(out.parent) == ["x.nii.gz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = atomic_write_text(tmp_path / "m.json", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["m.json"]


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = atomic_write_text(tmp_path / "preview.png", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
