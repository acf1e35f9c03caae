"""model/ never reads the environment: everything comes in as arguments (see STYLE.md).

Every module of the package is read with ``ast``, so a read of ``os.environ`` or
``os.getenv`` fails here wherever it hides (inside a function, behind an alias).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[2] / "model"
#: Names of the ``os`` module that read (or write) the process environment.
ENVIRONMENT_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def environment_reads(source: str) -> list[str]:
    """``line: os.<name>`` for every use of an environment name of ``os`` in ``source``."""
    tree = ast.parse(source)
    os_names = {"os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names.update(a.asname for a in node.names if a.name == "os" and a.asname)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            names = [a.name for a in node.names if a.name in ENVIRONMENT_NAMES]
            found += [f"{node.lineno}: os.{name}" for name in names]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ENVIRONMENT_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
        ):
            found.append(f"{node.lineno}: os.{node.attr}")
    return found


def test_model_modules_do_not_read_the_environment():
    modules = sorted(MODEL.rglob("*.py"))
    assert len(modules) > 10  # the walk found the package
    offenders = [
        f"model/{path.relative_to(MODEL)}:{read}"
        for path in modules
        for read in environment_reads(path.read_text())
    ]
    assert not offenders, "model/ must take settings as arguments:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "source",
    [
        "import os\nx = os.environ['A']\n",
        "import os\ndef f():\n    return os.environ.get('A')\n",
        "import os\nx = os.getenv('A')\n",
        "import os as o\nx = o.getenv('A')\n",
        "from os import environ\n",
        "from os import getenv as g\n",
    ],
)
def test_the_check_sees_a_read(source):
    assert environment_reads(source)


def test_the_check_passes_other_uses_of_os():
    assert environment_reads("import os\nos.replace('a', 'b')\np = os.PathLike\n") == []
