"""The product's inference choices and their defaults, defined once.

Settings (``service/config.py``), the command line's choices and the API's schemas are
built from these names; :mod:`model.inference.pipeline` and
:mod:`model.inference.tiling` give them their meaning. This module imports nothing heavy,
so a command line can read it at start-up.
"""

from __future__ import annotations

from typing import Literal, get_args

#: Post-processing modes (see :meth:`model.inference.pipeline.SegmentationOptions.for_postprocess`):
#: the main lesion kept, then small-component removal; the paper's two steps; the
#: relabelling guarded to tumours that hold core; small-component removal alone; nothing.
PostprocessMode = Literal["main-lesion", "paper", "guarded", "components", "none"]
POSTPROCESS_MODES: tuple[str, ...] = get_args(PostprocessMode)
#: The product's post-processing (measured best on cases from unseen sites).
DEFAULT_POSTPROCESS: PostprocessMode = "main-lesion"

#: Tile layouts (see :data:`model.inference.tiling.TILINGS`).
TilingName = Literal["wide", "paper", "fast"]
TILING_NAMES: tuple[str, ...] = get_args(TilingName)
#: The product's tiling: the paper's patches, a wider kept centre.
DEFAULT_TILING: TilingName = "wide"
