"""OM-Net and its ablations: one architecture description, one module per kind of network.

Variants (paper Table I):

- ``mc``: one single-task network with ``num_classes`` outputs (a part of the MC cascade);
- ``mc_cascade``: the MC baseline, three independent single-task nets (5, 5 and 2 classes);
- ``omnet``: one shared backbone, a CBR + classifier head per task;
- ``omnet_se``: ``omnet`` with a squeeze-and-excitation block before each classifier;
- ``omnet_cga``: task 1 keeps its head, tasks 2 and 3 are cross-task guided attention
  modules (task 2 guided by task 1, task 3 by task 2);
- ``omnet_cga_minus``: ``omnet_cga`` without the soft spatial masks.

Every network answers two calls:

- ``forward(x)``: one patch batch, all three task outputs in one pass (inference);
- ``forward_train(batches)``: one batch per task (``None`` for an inactive task),
  concatenated through the shared backbone and sliced back per task (training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F_
from torch import nn

from model.defaults import DEFAULT_NORMALISATION, NORMALISATIONS
from model.labels import CORE_CLASSES, NUM_TASK_CLASSES, TUMOUR_CLASSES
from model.net.blocks import Backbone, TaskHead
from model.net.cga import CrossTaskGuidedAttention

VARIANTS = ("mc", "mc_cascade", "omnet", "omnet_se", "omnet_cga", "omnet_cga_minus")
OMNET_VARIANTS = ("omnet", "omnet_se", "omnet_cga", "omnet_cga_minus")
_SPATIAL_MULTIPLE = 8


class TaskOutputs(NamedTuple):
    """Scores (logits) of the three tasks, each (B, C_k, D, H, W) or None when inactive."""

    coarse: torch.Tensor | None  # task 1: 5 classes
    tumour: torch.Tensor | None  # task 2: 5 classes
    enhancing: torch.Tensor | None  # task 3: 2 classes (not ET, ET)


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to rebuild a network; saved inside every checkpoint.

    Args:
        variant: one of ``VARIANTS``.
        in_channels: input modalities (4: T1, T1ce, T2, FLAIR).
        width: channels of the first level (32 in the paper); levels use w, 2w, 4w, 8w.
        dropout: dropout probability after the bottom level in training.
        num_classes: classes of a single ``mc`` network (ignored by other variants).
        normalisation: the input intensity normalisation the network was trained with
            (one of :data:`model.defaults.NORMALISATIONS`); inference normalises the same
            way. Checkpoints written before it existed hold the paper's z-score.
    """

    variant: str = "omnet_cga"
    in_channels: int = 4
    width: int = 32
    dropout: float = 0.5
    num_classes: int = 5
    normalisation: str = DEFAULT_NORMALISATION

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        if not isinstance(self.in_channels, int) or self.in_channels != 4:
            raise ValueError(
                f"in_channels must be 4 (T1, T1ce, T2, FLAIR); got {self.in_channels!r}"
            )
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width <= 0:
            raise ValueError(f"width must be a positive integer; got {self.width!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {self.dropout!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {self.num_classes!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"normalisation must be one of {', '.join(NORMALISATIONS)}; "
                f"got {self.normalisation!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _check_input(x: torch.Tensor, in_channels: int) -> None:
    if x.ndim != 5 or x.shape[1] != in_channels:
        raise ValueError(f"input must be (B, {in_channels}, D, H, W); got shape {tuple(x.shape)}")
    if any(s % _SPATIAL_MULTIPLE for s in x.shape[2:]):
        raise ValueError(
            f"input spatial size must be a multiple of {_SPATIAL_MULTIPLE}; "
            f"got {tuple(x.shape[2:])}"
        )


def _guidance(scores: torch.Tensor) -> torch.Tensor:
    """Detached class probabilities used to guide the next task."""
    return F_.softmax(scores.detach(), dim=1)


class SingleTaskNet(nn.Module):
    """One network of the MC cascade: backbone + CBR + classifier."""

    def __init__(self, config: ArchConfig, num_classes: int | None = None) -> None:
        super().__init__()
        self.in_channels = config.in_channels
        self.backbone = Backbone(config.in_channels, config.width, config.dropout)
        self.head = TaskHead(config.width, num_classes or config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels)
        return self.head(self.backbone(x))


class MCCascade(nn.Module):
    """The MC baseline: three independent single-task networks (5, 5 and 2 classes)."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.nets = nn.ModuleList(SingleTaskNet(config, c) for c in NUM_TASK_CLASSES)

    def forward(self, x: torch.Tensor) -> TaskOutputs:
        return TaskOutputs(*(net(x) for net in self.nets))

    def forward_train(self, batches: Sequence[torch.Tensor | None]) -> TaskOutputs:
        _check_batches(batches)
        return TaskOutputs(
            *(net(b) if b is not None else None for net, b in zip(self.nets, batches, strict=True))
        )


def _check_batches(batches: Sequence[torch.Tensor | None]) -> None:
    if len(batches) != 3:
        raise ValueError(f"batches must hold one entry per task (3); got {len(batches)}")
    if all(b is None for b in batches):
        raise ValueError("batches must hold at least one task's batch")


class OMNet(nn.Module):
    """One-pass multi-task network: shared backbone, three task heads (optionally CGA)."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        if config.variant not in OMNET_VARIANTS:
            raise ValueError(f"OMNet needs an OM-Net variant; got {config.variant!r}")
        self.config = config
        w = config.width
        self.backbone = Backbone(config.in_channels, w, config.dropout)
        self.coarse = TaskHead(w, NUM_TASK_CLASSES[0], config.variant == "omnet_se")
        self.uses_cga = config.variant in ("omnet_cga", "omnet_cga_minus")
        if self.uses_cga:
            soft = config.variant == "omnet_cga"
            self.tumour: nn.Module = CrossTaskGuidedAttention(
                w, NUM_TASK_CLASSES[1], TUMOUR_CLASSES, soft_masks=soft
            )
            self.enhancing: nn.Module = CrossTaskGuidedAttention(
                w, NUM_TASK_CLASSES[2], CORE_CLASSES, soft_masks=soft
            )
        else:
            se = config.variant == "omnet_se"
            self.tumour = TaskHead(w, NUM_TASK_CLASSES[1], se)
            self.enhancing = TaskHead(w, NUM_TASK_CLASSES[2], se)

    def _task1(self, f: torch.Tensor) -> torch.Tensor:
        return self.coarse(f)

    def _task2(self, f: torch.Tensor, s1: torch.Tensor | None = None) -> torch.Tensor:
        if not self.uses_cga:
            return self.tumour(f)
        if s1 is None:
            with torch.no_grad():
                s1 = self.coarse(f)
        return self.tumour(f, _guidance(s1))

    def _task3(self, f: torch.Tensor, s2: torch.Tensor | None = None) -> torch.Tensor:
        if not self.uses_cga:
            return self.enhancing(f)
        if s2 is None:
            with torch.no_grad():
                s2 = self._task2(f)
        return self.enhancing(f, _guidance(s2))

    def forward(self, x: torch.Tensor) -> TaskOutputs:
        """All three task outputs for one patch batch x (B, 4, D, H, W), in one pass."""
        _check_input(x, self.config.in_channels)
        f = self.backbone(x)  # (B, w, D, H, W)
        s1 = self._task1(f)
        s2 = self._task2(f, s1)
        s3 = self._task3(f, s2)
        return TaskOutputs(s1, s2, s3)

    def forward_train(self, batches: Sequence[torch.Tensor | None]) -> TaskOutputs:
        """Per-task batches through the shared backbone, each task's scores on its own slice.

        With CGA the task-2 and task-3 slices also pass through the preceding task(s) to
        get their guidance (paper Fig. 3); guidance is detached, so a task's loss never
        reaches the preceding task's parameters.
        """
        _check_batches(batches)
        active = [b for b in batches if b is not None]
        for b in active:
            _check_input(b, self.config.in_channels)
        sizes = [0 if b is None else b.shape[0] for b in batches]
        features = torch.cat(active, dim=0) if len(active) > 1 else active[0]
        f1, f2, f3 = torch.split(self.backbone(features), sizes, dim=0)
        return TaskOutputs(
            self._task1(f1) if sizes[0] else None,
            self._task2(f2) if sizes[1] else None,
            self._task3(f3) if sizes[2] else None,
        )


def build_model(config: ArchConfig) -> nn.Module:
    """The network ``config`` describes, He-initialised."""
    model: nn.Module
    if config.variant == "mc":
        model = SingleTaskNet(config)
    elif config.variant == "mc_cascade":
        model = MCCascade(config)
    else:
        model = OMNet(config)
    initialise(model)
    return model


def initialise(model: nn.Module) -> None:
    """He-normal convolution weights, biases 0.1 (0 in each backbone's first convolution)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.constant_(module.bias, 0.1)
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, Backbone):
            # Depth-first, so the first Conv3d is encoder[0][0][0]: EncoderLevel -> CBR -> Conv3d.
            first = next(m for m in module.encoder.modules() if isinstance(m, nn.Conv3d))
            if first.bias is not None:
                nn.init.zeros_(first.bias)


def count_parameters(model: nn.Module) -> int:
    """All trainable parameters (weights, biases and batch-norm affine parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, patch: tuple[int, int, int] = (16, 32, 32)) -> int:
    """Floating-point operations (2 per multiply-add) of convolutions for one patch.

    Counts Conv3d, ConvTranspose3d and Linear layers, which dominate; batch norm,
    activations and the CGA element-wise products are left out.
    """
    total = 0

    def conv_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv3d):
            k = module.weight[0].numel()  # in/groups * kd * kh * kw
            total += 2 * out.numel() * k
        elif isinstance(module, nn.ConvTranspose3d):
            k = module.weight.shape[1] * module.weight[0, 0].numel()  # out * kd * kh * kw
            total += 2 * inputs[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += 2 * out.numel() * module.in_features

    hooks = [
        m.register_forward_hook(conv_hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 4, *patch))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
