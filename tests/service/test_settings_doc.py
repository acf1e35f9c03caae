"""docs/settings.md is the table of ``Settings``' fields, generated: it cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_settings_page_is_up_to_date():
    script = ROOT / "scripts" / "settings_doc.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_every_field_has_a_row_with_its_description():
    from service.config import Settings

    text = (ROOT / "docs" / "settings.md").read_text()
    for name, field in Settings.model_fields.items():
        assert f"`OMNET_{name.upper()}`" in text
        assert field.description, f"Settings.{name} has no description"
