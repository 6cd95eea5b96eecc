"""Scene descriptors: masked mean pooling of (padded) image-level feature maps."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from .export_dispatch import export_masked_mean_pool, exporting


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
        (B, C) float32 scene descriptors; padding never contributes. The sums run in float32,
        so a large fp16 map under autocast (66,800 cells at stride 4 of 800x1333) cannot overflow.
        Under tracing or export: ``export_masked_mean_pool`` (image sizes may be tensors).
    """
    if len(feature_maps) != len(strides):
        raise ValueError(f"got {len(feature_maps)} feature maps but {len(strides)} strides")
    if not feature_maps:
        raise ValueError("masked_mean_pool needs at least one feature map")
    if len(image_sizes) != feature_maps[0].shape[0]:
        raise ValueError(
            f"{len(image_sizes)} image sizes for a batch of {feature_maps[0].shape[0]} feature maps"
        )
    if exporting():
        return export_masked_mean_pool(feature_maps, strides, image_sizes)
    per_image = []
    for b, (height, width) in enumerate(image_sizes):
        levels = [
            features[b, :, : max(1, math.ceil(height / stride)), : max(1, math.ceil(width / stride))]
            .mean(dim=(1, 2), dtype=torch.float32)
            for features, stride in zip(feature_maps, strides)
        ]
        per_image.append(torch.stack(levels).mean(dim=0))
    return torch.stack(per_image)


def masked_token_mean(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of each image's valid tokens.

    Args:
        tokens: (B, T, C) token features (e.g. transformer tokens or object queries).
        valid: (B, T) bool, True for tokens that count (not padding, not denoising queries).
    Returns:
        (B, C) float32; an image without valid tokens gets zeros.
    """
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        weights = valid.to(torch.float32).unsqueeze(1)  # (B, 1, T)
        total = torch.bmm(weights, tokens.to(torch.float32)).squeeze(1)
        return total / weights.sum(dim=2).clamp_min(1.0)
