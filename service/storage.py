"""Job files in a folder shared by the API and the workers.

Layout: ``<root>/jobs/<job id>/inputs/<name>.nii.gz`` and ``.../outputs/<name>``. Only job
ids and these relative keys travel through the broker.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import suppress
from pathlib import Path

OUTPUT_FILES = {
    "segmentation": "segmentation.nii.gz",
    "probabilities": "probabilities.nii.gz",
    "metrics": "metrics.json",
    "preview": "preview.png",
    "dicom_seg": "segmentation.dcm",
    "dicom_preview": "preview.dcm",
}


class Storage:
    """A local (or mounted) folder holding every job's inputs and outputs."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def path(self, key: str) -> Path:
        """Absolute path of a storage key; keys never leave the root."""
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"storage key {key!r} leaves the storage folder")
        return path

    def key(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def inputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "inputs"

    def outputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "outputs"

    def output(self, job_id: str, kind: str) -> Path:
        return self.outputs_dir(job_id) / OUTPUT_FILES[kind]

    def staging_dir(self) -> Path:
        """A fresh folder for an upload being checked (moved into place when accepted)."""
        base = self.root / "staging"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def sweep_staging(self, max_age_s: float, now: float | None = None) -> list[Path]:
        """Removes the staging folders that nothing in has changed for ``max_age_s``
        seconds: uploads an API process was checking when it died (a live one adopts or
        removes its folder). A folder's age is that of the newest file or folder in it,
        so one an upload is still being copied into is kept. Returns those removed."""
        base = self.root / "staging"
        now = time.time() if now is None else now
        removed = []
        for entry in base.iterdir() if base.is_dir() else ():
            try:
                changed = _last_change(entry)
            except OSError:  # removed meanwhile (adopted, or by another API process)
                continue
            if now - changed > max_age_s:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def adopt(self, staging: Path, job_id: str) -> None:
        """Moves a checked upload folder into the job's inputs."""
        dest = self.inputs_dir(job_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, dest)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def writable(self) -> bool:
        try:
            with tempfile.NamedTemporaryFile(dir=self.root):
                return True
        except OSError:
            return False


def _last_change(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with suppress(OSError):  # removed meanwhile
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest
