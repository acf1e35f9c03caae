"""The packages import one way: model/ <- service/ <- worker/ (see docs/development.md, "Layout").

Every import statement of every module is read with ``ast`` (imports inside functions
and under ``TYPE_CHECKING`` count too), so a violation fails here before it can run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Packages each package may not import.
FORBIDDEN = {"model": {"service", "worker"}, "service": {"worker"}, "worker": set()}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up(package):
    offenders = [
        f"{path.relative_to(ROOT)} imports {bad}"
        for path in _modules(package)
        for bad in sorted(_imported_packages(path) & FORBIDDEN[package])
    ]
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from worker.tasks import segment\n")
    assert "worker" in _imported_packages(bad)


def test_importing_the_api_builds_no_celery_app():
    import subprocess
    import sys

    code = (
        "import sys, celery; import service.app, service.queue, service.deps; "
        "from celery import _state; print(len(list(_state._get_active_apps())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "0"
