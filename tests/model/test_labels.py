"""Tests of model/labels.py: the label conventions module holds only what the package uses."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from model.labels import EDEMA, ENHANCING, NCR_NET, TaskClass, labels_to_task_target

MODEL = Path(__file__).resolve().parents[2] / "model"


def _public_functions_and_classes(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
    }


def _names_used(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name)
    return names


def test_every_function_and_class_is_used_by_the_package():
    labels = MODEL / "labels.py"
    used: set[str] = set()
    for path in MODEL.rglob("*.py"):
        if path != labels:
            used |= _names_used(path)
    unused = _public_functions_and_classes(labels) - used
    assert not unused, f"model/labels.py defines {sorted(unused)}, which no module of model/ uses"


def test_task_target_by_hand():
    labels = np.array([[[0, 0, NCR_NET, EDEMA, ENHANCING]]])
    brain = np.array([[[False, True, True, True, True]]])
    expected = [
        TaskClass.BACKGROUND,  # outside the brain
        TaskClass.NORMAL,  # brain without a tumour label
        TaskClass.NCR_NET,
        TaskClass.EDEMA,
        TaskClass.ENHANCING,
    ]
    np.testing.assert_array_equal(labels_to_task_target(labels, brain)[0, 0], expected)
