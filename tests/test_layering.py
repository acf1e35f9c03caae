"""The packages import one way: model/ <- service/ <- worker/ (see docs/development.md, "Layout"),
and inside model/ its sub-packages do too (the order in model/__init__.py).

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


#: model/'s sub-packages in import order: each may import the root modules of model
#: (labels, defaults, atomic, weights) and the sub-packages before it, never one after it.
MODEL_LAYERS = ("io", "net", "evaluation", "inference", "training")
MODEL_ROOT_MODULES = {"labels", "defaults", "atomic", "weights"}


def _model_parts(path: Path) -> set[str]:
    """The parts of model/ (a sub-package or a root module) that ``path`` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found.update(name.split(".")[1] for name in names if name.startswith("model."))
    return found


def test_every_model_module_belongs_to_a_layer():
    for path in _modules("model"):
        part = path.relative_to(ROOT / "model").parts[0].removesuffix(".py")
        assert part in MODEL_LAYERS or part in MODEL_ROOT_MODULES | {"__init__"}, path


@pytest.mark.parametrize("layer", MODEL_LAYERS)
def test_model_layers_import_downwards(layer):
    allowed = MODEL_ROOT_MODULES | set(MODEL_LAYERS[: MODEL_LAYERS.index(layer) + 1])
    offenders = [
        f"{path.relative_to(ROOT)} imports model.{part}"
        for path in sorted((ROOT / "model" / layer).rglob("*.py"))
        for part in sorted(_model_parts(path) - allowed)
    ]
    assert not offenders, "\n".join(offenders)


def test_model_root_modules_import_no_layer():
    offenders = [
        f"model/{name}.py imports model.{part}"
        for name in sorted(MODEL_ROOT_MODULES - {"weights"})
        for part in sorted(_model_parts(ROOT / "model" / f"{name}.py") & set(MODEL_LAYERS))
    ]
    assert not offenders, "\n".join(offenders)


def test_the_layer_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from model.inference.pipeline import Predictor\n")
    assert _model_parts(bad) == {"inference"}


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
