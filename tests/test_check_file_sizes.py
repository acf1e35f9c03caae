"""scripts/check_file_sizes.py: the 500-line limit of the product's modules, on trees
made here (whether the repository meets it is .ci/run's to say)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_file_sizes.py"


def _module(path: Path, lines: int, last_newline: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(f"x{i} = {i}" for i in range(lines))
    path.write_text(text + ("\n" if last_newline else ""))


def _check(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _tree(root: Path) -> Path:
    for folder in ("model", "service", "worker"):
        _module(root / folder / "__init__.py", 1)
    return root


def test_a_module_of_500_lines_passes(tmp_path):
    root = _tree(tmp_path)
    _module(root / "service" / "full.py", 500)
    _module(root / "worker" / "deep" / "no_newline.py", 500, last_newline=False)
    done = _check(root)
    assert done.returncode == 0, done.stderr
    assert done.stdout == done.stderr == ""


def test_a_module_of_501_lines_fails_naming_it_and_its_length(tmp_path):
    root = _tree(tmp_path)
    _module(root / "service" / "long.py", 501)
    _module(root / "model" / "sub" / "longer.py", 640, last_newline=False)
    _module(root / "worker" / "fine.py", 500)
    _module(root / "docs" / "elsewhere.py", 900)  # not a product folder
    (root / "service" / "notes.txt").write_text("x\n" * 900)  # not Python
    done = _check(root)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "model/sub/longer.py: 640 lines, more than 500; split it",
        "service/long.py: 501 lines, more than 500; split it",
    ]


def test_the_folders_and_the_limit_can_be_named(tmp_path):
    root = _tree(tmp_path)
    _module(root / "service" / "long.py", 501)
    _module(root / "worker" / "mid.py", 300)
    assert _check(root, "worker").returncode == 0
    done = _check(root, "--max-lines", "299", "worker")
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["worker/mid.py: 300 lines, more than 299; split it"]
    assert _check(root, "nowhere").returncode == 2  # a folder that is not there
