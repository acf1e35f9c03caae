"""The model shipped with the package (see the README's "Bundled model")."""

from __future__ import annotations

from pathlib import Path

BUNDLED_NAME = "omnet_cga.pt"


def bundled_checkpoint() -> Path | None:
    """Path of the bundled checkpoint, or None when this install has none."""
    path = Path(__file__).parent / BUNDLED_NAME
    return path if path.is_file() else None
