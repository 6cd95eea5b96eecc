"""Scene descriptors: masked mean pooling of (padded) image-level feature maps."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def masked_mean_pool(
    feature_maps: Sequence[torch.Tensor],
    strides: Sequence[int],
    image_sizes: Sequence[Tuple[int, int]],
) -> torch.Tensor:
    """Average each image's features over its valid (unpadded) area, then over levels.

    Args:
        feature_maps: L tensors (B, C, H_l, W_l) of a batch padded to a common size.
        strides: L ints, the stride of each level w.r.t. the input image.
        image_sizes: B pairs (h, w), each image's size before padding.
    Returns:
        (B, C) scene descriptors; padding never contributes.
    """
    if len(feature_maps) != len(strides):
        raise ValueError(f"got {len(feature_maps)} feature maps but {len(strides)} strides")
    if not feature_maps:
        raise ValueError("masked_mean_pool needs at least one feature map")
    device = feature_maps[0].device
    sizes = torch.as_tensor([list(s) for s in image_sizes], dtype=torch.float32, device=device)
    if sizes.shape[0] != feature_maps[0].shape[0]:
        raise ValueError(
            f"{sizes.shape[0]} image sizes for a batch of {feature_maps[0].shape[0]} feature maps"
        )
    pooled = []
    for features, stride in zip(feature_maps, strides):
        height, width = features.shape[-2:]
        valid = torch.ceil(sizes / stride).clamp_min(1.0)
        rows = torch.arange(height, device=device).view(1, height, 1) < valid[:, 0].view(-1, 1, 1)
        cols = torch.arange(width, device=device).view(1, 1, width) < valid[:, 1].view(-1, 1, 1)
        mask = (rows & cols).unsqueeze(1).to(features.dtype)  # (B, 1, H, W)
        area = mask.sum(dim=(2, 3))
        pooled.append((features * mask).sum(dim=(2, 3)) / area)
    return torch.stack(pooled).mean(dim=0)
