"""The speed reference of the benchmarks: MONAI's BraTS tutorial SegResNet.

SegResNet(blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), init_filters=16, in_channels=4,
out_channels=3), 4.7 M parameters, run with ``sliding_window_inference`` (roi 240 x 240
x 160, overlap 0.5, sw_batch_size 1) on the case's four z-scored modalities; its
weights are random (speed does not depend on them). Imports only what that needs, so
that a process running it starts as fast as a SegResNet user's would.
"""

from __future__ import annotations

import numpy as np
import torch

from model.inference.preprocess import brain_mask, zscore


def segresnet() -> torch.nn.Module:
    """MONAI's BraTS tutorial SegResNet (random weights), in eval mode."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
        init_filters=16,
        in_channels=4,
        out_channels=3,
        dropout_prob=0.2,
    ).eval()


def segresnet_regions(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The tutorial's inference on a case's ``(4, X, Y, Z)`` modalities: z-scored in the
    brain, one 240 x 240 x 160 window at a time (overlap 0.5); ``(3, X, Y, Z)`` masks of
    the tumour core, whole tumour and enhancing tumour."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(zscore(images, brain_mask(images)))[None]  # (1, 4, X, Y, Z)
    with torch.inference_mode():
        out = sliding_window_inference(x, (240, 240, 160), 1, net, overlap=0.5)
        assert isinstance(out, torch.Tensor)
        return (torch.sigmoid(out) > 0.5)[0].numpy()
