"""Overlap-tile inference: every brain voxel predicted exactly once, all tasks in one pass.

Arrays here are ``(C, X, Y, Z)`` with Z the slice axis of a case in RAS orientation; a
patch of the paper is 32 x 32 in-plane and 16 slices: ``(32, 32, 16)`` in array order.
The network wants ``(B, C, D, H, W)`` = ``(B, C, Z, X, Y)``: :func:`to_network` and
:func:`from_network` convert.

The paper keeps the centre 20 x 20 x 5 of each 32 x 32 x 16 prediction and leaves the
stride, the position of the five kept slices and the padding open. Choices made here
(:data:`PAPER_TILING`):

- the stride equals the kept size, so kept blocks tile the volume without overlap and
  every voxel is predicted exactly once;
- the kept block starts at offset (6, 6, 5) in the patch: centred in-plane, and slices
  5-9 of 16 along Z (five slices of context before, six after);
- the (cropped) volume is padded with zeros (the normalised background value) so that
  the first kept block starts at voxel 0 and the last one covers the end;
- a tile whose kept block holds no brain voxel is not run (its voxels are background).

The product's default (:data:`model.defaults.DEFAULT_TILING`) is :data:`WIDE_TILING`: the paper's
32 x 32 x 16 patches (the size the network was trained on), keeping their centre
24 x 24 x 8 (four voxels of context on every side) instead of 20 x 20 x 5. It runs 2.3x
fewer tiles, and its held-out Dice stays within a point of the paper's tiling (docs/model-card.md,
"Tiling" and "Speed"). ``--tiling paper`` is the paper's.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F_
from torch import nn

from model.defaults import DEFAULT_NORMALISATION, NORMALISATIONS, PRECISIONS, TtaMode, tta_mode
from model.labels import NUM_TASK_CLASSES, TaskClass

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


def to_network(patches: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, C, Z, X, Y), the network's (B, C, D, H, W)."""
    return patches.permute(0, 1, 4, 2, 3)


def from_network(scores: torch.Tensor) -> torch.Tensor:
    """(B, C, Z, X, Y) -> (B, C, X, Y, Z)."""
    return scores.permute(0, 1, 3, 4, 2)


@dataclass(frozen=True)
class TileLayout:
    """Patch size fed to the network, the block of each prediction kept, and its offset.

    All sizes in array order (X, Y, Z). Patch sizes must be multiples of 8.
    """

    patch: tuple[int, int, int] = (32, 32, 16)
    kept: tuple[int, int, int] = (20, 20, 5)
    offset: tuple[int, int, int] = (6, 6, 5)

    def __post_init__(self) -> None:
        for name in ("patch", "kept", "offset"):
            value = getattr(self, name)
            if len(value) != 3 or any(int(v) != v or v < 0 for v in value):
                raise ValueError(f"{name} must be three non-negative integers; got {value!r}")
        if any(p % 8 or p == 0 for p in self.patch):
            raise ValueError(f"patch sizes must be positive multiples of 8; got {self.patch}")
        for p, k, o in zip(self.patch, self.kept, self.offset, strict=True):
            if k < 1 or o + k > p:
                raise ValueError(
                    f"kept block {self.kept} at offset {self.offset} must lie inside the "
                    f"patch {self.patch}"
                )

    def grid(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Number of tiles along each axis of a volume of ``shape``."""
        x, y, z = (math.ceil(s / k) for s, k in zip(shape, self.kept, strict=True))
        return x, y, z

    def padding(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """(before, after) zero padding per axis so that every tile's patch fits."""
        pads = []
        for s, n, p, k, o in zip(
            shape, self.grid(shape), self.patch, self.kept, self.offset, strict=True
        ):
            pads.append((o, n * k + (p - k - o) - s))
        return pads

    def kept_origins(
        self, shape: Sequence[int], mask: np.ndarray | None = None
    ) -> list[tuple[int, int, int]]:
        """Corners of the kept blocks (unpadded coordinates); only those holding a brain
        voxel of ``mask`` when a mask is given."""
        xs, ys, zs = (range(0, n * k, k) for n, k in zip(self.grid(shape), self.kept, strict=True))
        origins = []
        for origin in itertools.product(xs, ys, zs):
            if mask is not None:
                block = tuple(slice(o, o + k) for o, k in zip(origin, self.kept, strict=True))
                if not mask[block].any():
                    continue
            origins.append(origin)
        return origins

    @property
    def efficiency(self) -> float:
        """Fraction of each patch's prediction that is kept."""
        return math.prod(self.kept) / math.prod(self.patch)


#: The paper's tiling: 32 x 32 x 16 patches, centre 20 x 20 x 5 kept.
PAPER_TILING = TileLayout()
#: Withdrawn from the product (:data:`model.defaults.WITHDRAWN_TILINGS`): 64 x 64 x 32
#: patches, centre 52 x 52 x 21 kept (43 % of each prediction kept instead of 12 %); same
#: context margins as the paper in-plane, but patches larger than the network trains on.
FAST_TILING = TileLayout(patch=(64, 64, 32), kept=(52, 52, 21), offset=(6, 6, 5))
#: The default: the paper's patch, its centre 24 x 24 x 8 kept (28 % of each prediction
#: kept instead of 12 %), four voxels of context on every side.
WIDE_TILING = TileLayout(patch=(32, 32, 16), kept=(24, 24, 8), offset=(4, 4, 4))
#: The layout of each name of :data:`model.defaults.TILING_NAMES` (the tilings the
#: command line and the settings offer).
TILINGS: dict[str, TileLayout] = {"paper": PAPER_TILING, "wide": WIDE_TILING}
#: Every named layout, the withdrawn ones (:data:`model.defaults.WITHDRAWN_TILINGS`)
#: included, for the benchmarks that measure them.
LAYOUTS: dict[str, TileLayout] = {**TILINGS, "fast": FAST_TILING}


class TaskProbabilities(NamedTuple):
    """Per-voxel class probabilities of the three tasks, each float32 (C_k, X, Y, Z)."""

    coarse: np.ndarray
    tumour: np.ndarray
    enhancing: np.ndarray


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' or None picks CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use 'cpu'")
    return resolved


def native_half_precision(device: torch.device) -> bool:
    """Whether ``device`` computes in half width natively: CUDA (float16), or a CPU with
    AVX512-BF16 or AMX tiles (bfloat16; elsewhere oneDNN emulates it, slower than
    float32)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device) -> bool:
    """Whether a predictor on ``device`` autocasts, for a precision of
    :data:`model.defaults.PRECISIONS`.

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return native_half_precision(device)
    return precision == "mixed"


#: Test-time augmentation: every combination of mirroring the patch's three spatial axes
#: (of a (B, C, X, Y, Z) batch), the identity first, as nnU-Net mirrors 3-D inputs.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))
#: The mirrorings each test-time augmentation averages: none, the left-right mirror alone
#: (the first axis of the canonical RAS grid; 2 passes), or all eight.
TTA_PASSES: dict[TtaMode, tuple[tuple[int, ...], ...]] = {
    "off": ((),),
    "mirror": ((), (2,)),
    "all": TTA_FLIPS,
}


class Predictor:
    """Runs one network, or an ensemble averaging probabilities, over a whole volume.

    Args:
        models: networks whose ``forward(x)`` returns ``TaskOutputs`` (every variant but
            a single ``mc`` net). Several models form an ensemble: their softmax
            probabilities are averaged per task.
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        batch_size: patches per forward pass.
        layout: the tiling (:data:`WIDE_TILING`, the default, or :data:`PAPER_TILING`...).
        mixed_precision: autocast (float16 on CUDA, bfloat16 on the CPU); defaults to on
            for CUDA, off for the CPU (the product's choice is made by
            :func:`resolve_precision`).
        channels_last: run the network on channels-last (NDHWC) tensors; defaults to on
            for the CPU, where oneDNN's 3-D convolutions run faster on that layout (the
            same probabilities to float rounding), off for CUDA.
        tta: test-time augmentation: every patch also goes through the network mirrored
            along each combination of axes (``True`` or ``'all'``: :data:`TTA_FLIPS`, 8
            passes) or left-right only (``'mirror'``, 2 passes); each output is mirrored
            back and the probabilities are averaged (:data:`TTA_PASSES`). Not in the paper.
        normalisation: the intensity normalisation the models were trained with (their
            checkpoints' ``normalisation``); whole-case segmentation normalises its input
            this way before :meth:`predict`.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        device: str | torch.device | None = "auto",
        batch_size: int = 16,
        layout: TileLayout = WIDE_TILING,
        mixed_precision: bool | None = None,
        tta: bool | str = False,
        channels_last: bool | None = None,
        normalisation: str = DEFAULT_NORMALISATION,
    ) -> None:
        if not models:
            raise ValueError("models must hold at least one network")
        if normalisation not in NORMALISATIONS:
            raise ValueError(
                f"normalisation must be one of {', '.join(NORMALISATIONS)}; got {normalisation!r}"
            )
        self.normalisation = normalisation
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.device = resolve_device(device)
        self.models = [m.to(self.device).eval() for m in models]
        self.batch_size = batch_size
        self.layout = layout
        self.tta = tta_mode(tta)
        self.flips = TTA_PASSES[self.tta]
        self.mixed_precision = (
            self.device.type == "cuda" if mixed_precision is None else mixed_precision
        )
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        if self.channels_last:
            channels_last_3d = torch.channels_last_3d
            # Module.to takes memory_format at run time; its type stubs do not say so.
            self.models = [m.to(memory_format=channels_last_3d) for m in self.models]  # type: ignore[call-overload]

    @property
    def precision(self) -> str:
        """The arithmetic of the network's pass: float32, float16 or bfloat16."""
        if not self.mixed_precision:
            return "float32"
        return "float16" if self.device.type == "cuda" else "bfloat16"

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """Mean softmax probabilities over the models and mirrorings, each (B, C, X, Y, Z),
        on the predictor's device."""
        patches = (
            batch.to(self.device)
            if isinstance(batch, torch.Tensor)
            else torch.from_numpy(batch).to(self.device)
        )  # (B, C, X, Y, Z)
        sums: list[torch.Tensor] = []
        # Same input, same output: no autotuned (run-dependent) cuDNN algorithms, for this
        # pass only (a training run in the same process keeps its own settings).
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True
        ):
            for flip in self.flips:
                x = to_network(patches.flip(flip) if flip else patches)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                for model in self.models:
                    with torch.autocast(self.device.type, enabled=self.mixed_precision):
                        outputs = model(x)
                    probs = [from_network(F_.softmax(s.float(), dim=1)) for s in outputs]
                    if flip:
                        probs = [p.flip(flip) for p in probs]  # back to the patch's own orientation
                    sums = probs if not sums else [a + b for a, b in zip(sums, probs, strict=True)]
        passes = len(self.models) * len(self.flips)
        return [p / passes for p in sums]

    def _batches(self, origins: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
        for i in range(0, len(origins), self.batch_size):
            yield origins[i : i + self.batch_size]

    def predict(
        self,
        images: np.ndarray,
        mask: np.ndarray | None = None,
        progress: ProgressCallback | None = None,
    ) -> TaskProbabilities:
        """Probabilities of every task for every voxel of ``images`` (C, X, Y, Z).

        Voxels in tiles without any ``mask`` voxel are set to background (probability 1
        of class 0 in tasks 1-2, of 'not ET' in task 3).
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (C, X, Y, Z); got shape {images.shape}")
        shape = images.shape[1:]
        layout = self.layout
        padded_np = np.pad(images.astype(np.float32, copy=False), [(0, 0), *layout.padding(shape)])
        origins = layout.kept_origins(shape, mask)
        # The padded volume goes to the device once; patches are cut there, and only the
        # kept centre of each prediction is written into outputs that stay on the device
        # until the end (one copy back instead of whole patches per batch).
        padded = torch.from_numpy(padded_np).to(self.device)
        out = [
            torch.zeros((c, *shape), dtype=torch.float32, device=self.device)
            for c in NUM_TASK_CLASSES
        ]
        for probs in out:
            probs[TaskClass.BACKGROUND] = 1.0  # class 0 of every task: background / not ET
        centre = tuple(slice(o, o + k) for o, k in zip(layout.offset, layout.kept, strict=True))
        done = 0
        for chunk in self._batches(origins):
            # A patch whose kept block starts at o starts at o in the padded volume.
            batch = torch.stack(
                [
                    padded[
                        (
                            slice(None),
                            *(slice(o, o + p) for o, p in zip(origin, layout.patch, strict=True)),
                        )
                    ]
                    for origin in chunk
                ]
            )
            task_probs = self._forward(batch)  # each (B, C, X, Y, Z), on the device
            for i, origin in enumerate(chunk):
                dest = tuple(
                    slice(o, min(o + k, s))
                    for o, k, s in zip(origin, layout.kept, shape, strict=True)
                )
                clip = tuple(
                    slice(c.start, c.start + (d.stop - d.start))
                    for c, d in zip(centre, dest, strict=True)
                )
                for target, tile_probs in zip(out, task_probs, strict=True):
                    target[(slice(None), *dest)] = tile_probs[i][(slice(None), *clip)]
            done += len(chunk)
            if progress is not None:
                progress(done, len(origins))
        result = TaskProbabilities(*(t.cpu().numpy() for t in out))
        logger.debug("predicted %d tiles of %s on %s", len(origins), layout.patch, self.device)
        return result
