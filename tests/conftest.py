"""Shared test fixtures: where the real BraTS cases live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_ENV = "OMNET_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The real-data folder: ``$OMNET_DATA_DIR``, by default ``<repo>/../shared/data``."""
    value = os.environ.get(DATA_ENV)
    return Path(value) if value else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def brats_case_dir() -> Path:
    """The first BraTS 2018 case folder under ``data_dir()/brats2018``; skips if none."""
    root = data_dir() / "brats2018"
    cases = (
        sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*_t1.nii*")))
        if root.is_dir()
        else []
    )
    if not cases:
        pytest.skip(
            f"no BraTS 2018 case folder under {root}; set {DATA_ENV} to the folder "
            "that holds brats2018/<case>/"
        )
    return cases[0]
