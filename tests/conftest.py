"""Shared test fixtures: where the real BraTS cases live, and the job databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from model.training.data import DATA_ENV, resolve_data_dir

__all__ = ["DATA_ENV", "data_dir"]

#: The PostgreSQL server whose throwaway databases the job-store tests also run on (a
#: role that may create databases); they skip with the reason when it cannot be reached.
POSTGRES_URL = os.environ.get(
    "OMNET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


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


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database of its own on the PostgreSQL server at
    ``OMNET_TEST_POSTGRES_URL`` (dropped afterwards); skips, saying why, when the server
    cannot be reached."""
    import sqlalchemy as sa

    try:
        admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        pytest.skip(
            f"no PostgreSQL at {POSTGRES_URL} ({type(exc).__name__}); install the 'postgres' "
            "extra and set OMNET_TEST_POSTGRES_URL to a role that may create databases"
        )
    name = f"omnet_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty job database: a SQLite file, or a database of its own on the
    PostgreSQL server at ``OMNET_TEST_POSTGRES_URL`` (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def dicom_corpus(brats_case_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The DICOM conformance corpus (:mod:`tests.dicom_corpus`) of the first BraTS 2018
    case, cropped around its tumour; skips without the data."""
    from tests.dicom_corpus import build_corpus

    return build_corpus(brats_case_dir, tmp_path_factory.mktemp("dicom-corpus"))


#: The project's bench/ scripts (imported by their tests through :func:`bench_module`).
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def bench_module(script: str, name: str) -> Any:
    """``bench/<script>`` imported as module ``name`` (a fresh copy per name)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
