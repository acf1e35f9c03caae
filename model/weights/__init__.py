"""The model shipped with the package (see docs/model-card.md).

This is the one place that knows where the bundled checkpoint lives; the command line
and the workers ask :func:`bundled_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_NAME = "omnet_cga.pt"
#: Where the bundled checkpoint is installed (it may be absent from an install).
BUNDLED_PATH = Path(__file__).resolve().parent / BUNDLED_NAME


def bundled_checkpoint() -> Path | None:
    """Path of the bundled checkpoint, or None when this install has none."""
    return BUNDLED_PATH if BUNDLED_PATH.is_file() else None
