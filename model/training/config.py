"""The configuration and the resumable state of a training run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from model.defaults import DEFAULT_NORMALISATION, DEFAULT_TILING, LOSSES, tiling_error
from model.inference.tiling import TILINGS
from model.net.network import ArchConfig

STATE_VERSION = 1


TASK_NAMES = ("coarse", "tumour", "enhancing")


#: Patch augmentation sets: nnU-Net's default set, or that plus scanner imitation.
AUGMENT_PRESETS = ("default", "site")


@dataclass(frozen=True)
class TrainConfig:
    """A training run's recipe; saved in the run directory and the checkpoints."""

    variant: str = "omnet_cga"
    width: int = 32
    dropout: float = 0.5
    stage_epochs: tuple[int, int, int] = (1, 1, 18)
    curriculum: bool = True
    transfer: bool = True
    steps_per_epoch: int = 1000
    batch_per_task: int = 20
    lr: float = 1e-3
    momentum: float = 0.99
    weight_decay: float = 5e-4
    lr_halve_every: int = 4
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    val_tiling: str = DEFAULT_TILING
    val_every: int = 1
    task1_tumour_fraction: float = 0.0
    augment: bool = False
    augment_preset: str = "default"  # "site": AugmentConfig.site_shift()
    normalisation: str = DEFAULT_NORMALISATION
    init_checkpoint: str | None = None
    loss: str = LOSSES[0]

    def __post_init__(self) -> None:
        if len(self.stage_epochs) != 3 or any(e < 0 for e in self.stage_epochs):
            raise ValueError(f"stage_epochs must be three counts >= 0; got {self.stage_epochs}")
        if sum(self.stage_epochs) < 1:
            raise ValueError("stage_epochs must add up to at least one epoch")
        for name in (
            "steps_per_epoch",
            "batch_per_task",
            "lr_halve_every",
            "checkpoint_every",
            "log_every",
            "val_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1); got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if not 0.0 <= self.task1_tumour_fraction <= 1.0:
            raise ValueError(
                f"task1_tumour_fraction must lie in [0, 1]; got {self.task1_tumour_fraction}"
            )
        if self.val_tiling not in TILINGS:
            raise ValueError(f"val_tiling: {tiling_error(self.val_tiling)}")
        if self.augment_preset not in AUGMENT_PRESETS:
            raise ValueError(
                f"augment_preset must be one of {AUGMENT_PRESETS}; got {self.augment_preset!r}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.variant == "mc":
            raise ValueError("variant 'mc' is one network; train the MC baseline as 'mc_cascade'")
        self.arch  # noqa: B018 - checks the architecture and the normalisation

    @property
    def epochs(self) -> int:
        return sum(self.stage_epochs)

    @property
    def arch(self) -> ArchConfig:
        return ArchConfig(
            variant=self.variant,
            width=self.width,
            dropout=self.dropout,
            normalisation=self.normalisation,
        )

    def active_tasks(self, epoch: int) -> tuple[bool, bool, bool]:
        """Tasks trained in ``epoch`` (0-based)."""
        if not self.curriculum or self.variant == "mc_cascade":
            return (True, True, True)
        s1, s2, _ = self.stage_epochs
        if epoch < s1:
            return (True, False, False)
        if epoch < s1 + s2:
            return (True, True, False)
        return (True, True, True)

    @property
    def online_transfer(self) -> bool:
        """Whether the sampler transfers patches between tasks (never for ``mc_cascade``)."""
        return self.transfer and self.variant != "mc_cascade"

    def learning_rate(self, epoch: int) -> float:
        return self.lr * 0.5 ** (epoch // self.lr_halve_every)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stage_epochs"] = list(self.stage_epochs)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "stage_epochs" in known:
            known["stage_epochs"] = tuple(known["stage_epochs"])
        return cls(**known)


@dataclass
class TrainState:
    """Where a run stands; everything in it is saved in ``state.pt``."""

    epoch: int = 0
    step: int = 0  # within the epoch
    global_step: int = 0
    patches_seen: int = 0
    seconds: float = 0.0
    best_score: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainingInterruptedError(Exception):
    """Training stopped early (signal or time budget) after saving its state."""
