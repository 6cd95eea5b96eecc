"""Routing of the instances a detector keeps as predictions (opt-in prediction fields)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .router import Routing


def routing_of_kept(
    routing: Routing, counts: Sequence[int], kept: Sequence[torch.Tensor]
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the experts and weights of the instances that became predictions.

    Args:
        routing: the routing of all images' instances, image after image (``counts[i]`` rows
            for image i).
        counts: instances per image.
        kept: per image, (n_i,) long indices (within that image's instances) of the predictions.
    Returns:
        per image ``(expert_index (n_i, k) long, combine_weight (n_i, k) float32)``.
    """
    if sum(counts) != routing.expert_index.shape[0] or len(counts) != len(kept):
        raise ValueError(
            f"routing of {routing.expert_index.shape[0]} instances does not match counts {list(counts)} "
            f"of {len(kept)} images"
        )
    out = []
    start = 0
    for count, rows in zip(counts, kept):
        rows = rows.to(routing.expert_index.device, torch.long) + start
        out.append((routing.expert_index[rows], routing.combine_weight[rows].float()))
        start += count
    return out
