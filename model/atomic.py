"""Atomic file writes: readers see the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Calls ``write(tmp)`` on a hidden temporary path beside ``path``, then renames it
    into place; the temporary file is removed on failure. Parent folders are created.

    The temporary name keeps ``path``'s full suffix (``.nii.gz``, ``.png``, ...), so
    writers that pick a format by file name still do. The file gets the process's usual
    permissions (the umask's), like any other file it writes.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) if target.suffixes else ""
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    tmp = target.with_name(f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as done:  # on disk before it takes the real name
            os.fsync(done.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
