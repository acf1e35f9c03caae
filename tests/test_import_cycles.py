"""No import cycles among the modules of service/ and worker/ (model/ too).

Modules are read with ``ast``, as tests/test_layering.py does. An import at module level
(under ``if``/``try`` and in class bodies too) runs when the module is imported: a cycle
of those fails, whatever the order Python happens to load them in. Imports inside
functions run later, when the function is called; they are the deliberate lazy pattern
(torch and the DICOM stack loaded only by the commands that need them), yet a cycle
through them still means two modules that each need the other, so it fails too. Imports
under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "service", "worker")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(body: Iterable[ast.stmt], in_functions: bool) -> Iterable[ast.stmt]:
    """The import statements of ``body``, nested blocks included; those in function
    bodies only with ``in_functions``; never those under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if in_functions:
                yield from _import_nodes(node.body, in_functions)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse, in_functions)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    yield from _import_nodes(block, in_functions)


def imported_modules(
    root: Path, path: Path, known: set[str], in_functions: bool = False
) -> set[str]:
    """The modules among ``known`` that the module at ``path`` imports."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in _import_nodes(tree.body, in_functions):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path, packages: Iterable[str], in_functions: bool) -> dict[str, set[str]]:
    paths = {module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    known = set(paths)
    return {m: imported_modules(root, p, known, in_functions) for m, p in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one
    module (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize("in_functions", [False, True], ids=["module level", "with functions"])
def test_no_import_cycles(in_functions):
    found = cycles(import_graph(ROOT, PACKAGES, in_functions))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_check_sees_a_module_level_cycle(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import thing\n",
            "pkg/b.py": "try:\n    from . import c\nexcept ImportError:\n    pass\n",
            "pkg/c.py": "import pkg.a\n\nthing = 1\n",
            "pkg/d.py": "from pkg import a\n",  # imports into the cycle, is not part of it
        },
    )
    for in_functions in (False, True):
        assert cycles(import_graph(root, ["pkg"], in_functions)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_check_tells_lazy_and_type_only_imports_apart(tmp_path):
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/app.py": "def create():\n    import pkg.tasks\n",
            "pkg/tasks.py": "from pkg.app import create\n",
            "pkg/hints.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
            "    from pkg.types import T\n",
            "pkg/types.py": "from pkg.hints import T\n",
        },
    )
    assert cycles(import_graph(root, ["pkg"], in_functions=False)) == []
    assert cycles(import_graph(root, ["pkg"], in_functions=True)) == [["pkg.app", "pkg.tasks"]]
