"""Fails when a Python module of the product is longer than the house limit.

    python scripts/check_file_sizes.py                    # model/, service/, worker/
    python scripts/check_file_sizes.py --max-lines 400 service

A module past the limit (500 lines) is split at a real seam, not trimmed. Each offending
file is printed on a line of its own, with its length, and the exit status is 1; 0 when
every file is within the limit. ``.ci/run`` runs it before the tests. Needs only the
standard library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The folders checked unless others are named: the product's code.
FOLDERS = ("model", "service", "worker")
#: Most lines a module may have.
MAX_LINES = 500


def count_lines(path: Path) -> int:
    """Lines of ``path`` as an editor numbers them (a last line without newline counts)."""
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def too_long(root: Path, folders: Iterable[str], max_lines: int) -> list[tuple[Path, int]]:
    """``(path relative to root, lines)`` of every ``.py`` file under ``folders`` with
    more than ``max_lines`` lines, sorted by path."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            lines = count_lines(path)
            if lines > max_lines:
                found.append((path.relative_to(root), lines))
    return sorted(found)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("folders", nargs="*", default=FOLDERS, help=f"default: {' '.join(FOLDERS)}")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folders' root (the repo)")
    parser.add_argument("--max-lines", type=int, default=MAX_LINES, help="default: %(default)s")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not (args.root / f).is_dir()]
    if missing:
        parser.error(f"no folder {', '.join(missing)} under {args.root}")
    offenders = too_long(args.root, args.folders, args.max_lines)
    for path, lines in offenders:
        print(f"{path}: {lines} lines, more than {args.max_lines}; split it", file=sys.stderr)
    return 1 if offenders else 0


if __name__ == "__main__":
    raise SystemExit(main())
