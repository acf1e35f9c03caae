"""Writes docs/settings.md from the fields of ``service.config.Settings``.

    python scripts/settings_doc.py          # rewrite docs/settings.md
    python scripts/settings_doc.py --check  # exit 1 when the file is out of date

The table is built from the fields themselves (name, default, description), so the
documentation cannot drift from the code; a test runs the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import SecretStr  # noqa: E402

from service.config import Settings  # noqa: E402

TARGET = ROOT / "docs" / "settings.md"

HEADER = """# Settings

Every setting is an environment variable, `OMNET_` and the field name in upper case,
read once when a process starts (`omnet serve`, `omnet worker`, the API processes). The
API processes and the workers of one deployment share the same settings and storage
folder. This table is generated from the fields of `Settings` in `service/config.py`
(`python scripts/settings_doc.py`); a test fails when it is out of date.

| variable | default | meaning |
|---|---|---|
"""


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def render() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `OMNET_{name.upper()}` | {_default(field.default)} | {description} |")
    return HEADER + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date: run python scripts/settings_doc.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
