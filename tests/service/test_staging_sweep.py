"""Staging folders left by an API process that died mid-upload are removed, at the API's
start and by its periodic clean-up; those of uploads in progress are kept.

Real folders in a real storage folder, aged by setting their modification times.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app, staging_max_age_s
from service.config import Settings
from service.storage import Storage
from tests.service.support import wait_until

HOUR_S = 3600.0


def _age(path: Path, seconds: float) -> None:
    """Sets the modification time of ``path`` and everything in it ``seconds`` back."""
    then = time.time() - seconds
    for folder, dirs, files in os.walk(path, topdown=False):
        for name in (*dirs, *files):
            os.utime(os.path.join(folder, name), (then, then))
    os.utime(path, (then, then))


def _staged(storage: Storage, age_s: float, *files: str) -> Path:
    """A staging folder as an upload leaves it, holding ``files``, ``age_s`` old."""
    folder = storage.staging_dir()
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\x1f\x8b" + os.urandom(64))
    _age(folder, age_s)
    return folder


def test_the_sweep_removes_old_folders_and_keeps_those_in_use(tmp_path):
    storage = Storage(tmp_path / "storage")
    dead = _staged(storage, 3 * HOUR_S, "t1.nii.gz", "t1ce.nii.gz")
    dead_dicom = _staged(storage, 3 * HOUR_S, "dicom/00000.dcm", "dicom/00001.dcm")
    fresh = _staged(storage, 5, "t1.nii.gz")  # an upload being checked now
    # An old folder into which a part is being copied now (its folder's time is old).
    copying = _staged(storage, 3 * HOUR_S, "dicom/00000.dcm")
    (copying / "dicom" / "00001.dcm").write_bytes(b"DICM")
    os.utime(copying / "dicom", (time.time() - 3 * HOUR_S,) * 2)
    stray = storage.root / "staging" / "left.part"
    stray.write_bytes(b"x")
    _age(stray, 3 * HOUR_S)

    removed = storage.sweep_staging(2 * HOUR_S)
    assert sorted(removed) == sorted([dead, dead_dicom, stray])
    assert not dead.exists() and not dead_dicom.exists() and not stray.exists()
    assert fresh.is_dir() and (fresh / "t1.nii.gz").is_file()
    assert (copying / "dicom" / "00001.dcm").is_file()
    assert storage.sweep_staging(2 * HOUR_S) == []


def test_no_staging_folder_yet_is_nothing_to_sweep(tmp_path):
    assert Storage(tmp_path / "storage").sweep_staging(0) == []


def test_the_bound_is_twice_the_job_time_limit_and_at_least_an_hour():
    assert staging_max_age_s(Settings()) == 2 * 3600.0
    assert staging_max_age_s(Settings(job_time_limit_s=7200)) == 4 * 3600.0
    assert staging_max_age_s(Settings(job_time_limit_s=60)) == HOUR_S


def test_the_api_sweeps_at_start_and_in_its_periodic_clean_up(tmp_path):
    settings = Settings(storage_dir=tmp_path / "storage", open_mode=True, cleanup_interval_s=0.2)
    bound = staging_max_age_s(settings)
    storage = Storage(settings.storage_dir)
    left = _staged(storage, bound + 60, "t1.nii.gz", "flair.nii.gz")
    fresh = _staged(storage, 1, "t1.nii.gz")
    app = create_app(settings)
    with TestClient(app):
        assert not left.exists(), "not swept at start"
        assert fresh.is_dir()
        # Left behind while the API runs (another API process sharing the storage died).
        later = _staged(storage, bound + 60, "image.nii.gz")
        wait_until(lambda: not later.exists(), 10, "the periodic clean-up to sweep it")
        time.sleep(0.5)  # a few more rounds
        assert fresh.is_dir() and (fresh / "t1.nii.gz").is_file()
    app.state.store.engine.dispose()
