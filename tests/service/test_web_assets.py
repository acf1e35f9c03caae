"""The web page's third-party assets are the pinned releases, and they install.

``scripts/fetch_web_assets.py`` copies them from npm and records their versions and
SHA-256 in ``service/static/vendor/assets.json``; a file changed by hand, or a pin
changed without fetching again, fails here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "service" / "static"
VENDOR = STATIC / "vendor"


def _fetch_script():
    spec = importlib.util.spec_from_file_location(
        "fetch_web_assets", ROOT / "scripts/fetch_web_assets.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((VENDOR / "assets.json").read_text())


def test_assets_are_the_pinned_versions(recorded: dict) -> None:
    script = _fetch_script()
    assert {p: r["version"] for p, r in recorded.items()} == script.PINS
    assert recorded["@niivue/niivue"]["license"] == "BSD-2-Clause"
    bundle = (VENDOR / "niivue/niivue.umd.js").read_text()
    assert f'version:"{script.PINS["@niivue/niivue"]}"' in bundle
    swagger = (VENDOR / "swagger-ui/swagger-ui-bundle.js").read_text()
    assert f'"{script.PINS["swagger-ui-dist"]}"' in swagger


def test_asset_files_match_their_recorded_sha256(recorded: dict) -> None:
    listed = set()
    for package, record in recorded.items():
        assert record["integrity"].startswith("sha512-"), package
        for name, digest in record["files"].items():
            listed.add(name)
            data = (VENDOR / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, f"{name} is not {package}'s"
    on_disk = {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file()}
    assert on_disk - {"assets.json"} == listed
    for folder in ("niivue", "swagger-ui"):
        assert "LICENSE" in {Path(n).name for n in listed if n.startswith(f"{folder}/")}


def test_every_static_file_is_package_data() -> None:
    """pyproject.toml's package-data covers service/static, so a wheel serves the page."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    files = [p.relative_to(ROOT / "service").as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert files
    missing = [f for f in files if not any(fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f"not installed by pyproject.toml's package-data: {missing}"
