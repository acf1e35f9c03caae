"""Building blocks of the 3D FusionNet-style backbone shared by every OM-Net variant.

Tensors are laid out (B, C, D, H, W); a training patch is 16 x 32 x 32 (D x H x W).
"""

from __future__ import annotations

import torch
from torch import nn


class CBR(nn.Sequential):
    """Conv3d 3x3x3 (stride 1, padding 1) -> BatchNorm3d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """x -> CBR -> CBR -> Conv3d -> BN, added to x, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            CBR(channels, channels),
            CBR(channels, channels),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm3d(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + x)


class EncoderLevel(nn.Sequential):
    """CBR(in, c) -> RB(c) -> CBR(c, c), at one resolution."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__(
            CBR(in_channels, channels), ResidualBlock(channels), CBR(channels, channels)
        )


class UpStep(nn.Sequential):
    """ConvTranspose3d 2x2x2, stride 2 (halves the channels) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderLevel(nn.Module):
    """Up-sampling step, sum with the encoder skip (no ReLU after the sum), then convolutions.

    The last (finest) level ends after its residual block: ``CBR -> RB`` instead of
    ``CBR -> RB -> CBR``.
    """

    def __init__(self, channels: int, last: bool = False) -> None:
        super().__init__()
        self.up = UpStep(channels * 2, channels)
        layers: list[nn.Module] = [CBR(channels, channels), ResidualBlock(channels)]
        if not last:
            layers.append(CBR(channels, channels))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.body(self.up(x) + skip)


class Backbone(nn.Module):
    """The shared encoder-decoder: (B, in_channels, D, H, W) -> F of shape (B, width, D, H, W).

    D, H and W must be multiples of 8 (three 2x poolings).
    """

    def __init__(self, in_channels: int, width: int, dropout: float) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        ins = [in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(EncoderLevel(i, c) for i, c in zip(ins, widths, strict=True))
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.ModuleList(
            DecoderLevel(c, last=(c == width)) for c in reversed(widths[:-1])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in self.encoder[:-1]:
            x = level(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.encoder[-1](x))  # bottom: (B, 8w, D/8, H/8, W/8)
        for level, skip in zip(self.decoder, reversed(skips), strict=True):
            x = level(x, skip)
        return x  # F: (B, w, D, H, W)


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool -> FC (reduce) -> ReLU -> FC -> sigmoid scale.

    Both fully connected layers have no bias, as in the released definitions.
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(x.mean(dim=(2, 3, 4)))  # (B, C)
        return x * weights[:, :, None, None, None]


class TaskHead(nn.Module):
    """A task's own layers in OM-Net: CBR(w, w) [-> SE] -> Conv3d 1x1x1 (w -> classes)."""

    def __init__(self, width: int, num_classes: int, squeeze_excitation: bool = False) -> None:
        super().__init__()
        self.cbr = CBR(width, width)
        self.se = SqueezeExcitation(width) if squeeze_excitation else nn.Identity()
        self.classifier = nn.Conv3d(width, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.se(self.cbr(features)))
