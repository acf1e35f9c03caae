"""Shared test fixtures: where the real BraTS cases live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model.data import DATA_ENV, resolve_data_dir

__all__ = ["DATA_ENV", "data_dir"]


def data_dir() -> Path:
    """The real-data folder: ``$OMNET_DATA_DIR``, by default ``../shared/data`` beside the
    source checkout."""
    return resolve_data_dir(os.environ.get(DATA_ENV))


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
