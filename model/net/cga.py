"""Cross-task guided attention (CGA), paper section III-C, equations 3-9.

A CGA module turns the shared feature map F into a task's scores, guided by the
(detached) class probabilities P of the preceding task:

- category probabilities (eq. 3-4): P_t = sum of P over the guiding "target" classes,
  P_n = sum over the others;
- CSCI block (eq. 5-6): m_t[i] = sum_v F[i, v] * P_t[v], L1-normalised over channels
  (likewise m_n with P_n);
- CompSeg block (eq. 7-9): U_t = m_t * F, U_n = m_n * F; S_t = conv1x1(U_t),
  S_n = conv1x1(U_n); S~ = P_t * S_t + P_n * S_n; S = conv1x1(S~).

No non-linearity anywhere inside. The "CGA-minus" ablation drops the soft spatial
masks: S~ = S_t + S_n.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_EPS = 1e-12


def category_probabilities(
    probs: torch.Tensor, target_classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits class probabilities (B, C, ...) into P_t and P_n, each (B, 1, ...)."""
    p_t = probs[:, list(target_classes)].sum(dim=1, keepdim=True)
    others = [c for c in range(probs.shape[1]) if c not in set(target_classes)]
    p_n = probs[:, others].sum(dim=1, keepdim=True)
    return p_t, p_n


def channel_statistics(features: torch.Tensor, spatial_prob: torch.Tensor) -> torch.Tensor:
    """CSCI: probability-weighted channel sums, L1-normalised over channels.

    Args:
        features: F, shape (B, C, D, H, W).
        spatial_prob: P_t or P_n, shape (B, 1, D, H, W).

    Returns:
        m of shape (B, C, 1, 1, 1).
    """
    m = (features * spatial_prob).sum(dim=(2, 3, 4), keepdim=True)  # (B, C, 1, 1, 1)
    return m / m.abs().sum(dim=1, keepdim=True).clamp_min(_EPS)


class CrossTaskGuidedAttention(nn.Module):
    """CGA module producing ``num_classes`` scores from F under a preceding task's guidance.

    Args:
        channels: channels of F.
        num_classes: classes of this task.
        target_classes: indices of the guiding task's classes that make up P_t.
        soft_masks: False gives the CGA-minus ablation (S~ = S_t + S_n).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        target_classes: Sequence[int],
        soft_masks: bool = True,
    ) -> None:
        super().__init__()
        self.target_classes = tuple(int(c) for c in target_classes)
        self.soft_masks = soft_masks
        self.target_scores = nn.Conv3d(channels, num_classes, kernel_size=1)
        self.non_target_scores = nn.Conv3d(channels, num_classes, kernel_size=1)
        self.fuse = nn.Conv3d(num_classes, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Scores S (B, num_classes, D, H, W) from F and the guiding probabilities P."""
        p_t, p_n = category_probabilities(guidance, self.target_classes)
        s_t = self.target_scores(channel_statistics(features, p_t) * features)
        s_n = self.non_target_scores(channel_statistics(features, p_n) * features)
        if self.soft_masks:
            return self.fuse(p_t * s_t + p_n * s_n)
        return self.fuse(s_t + s_n)
