"""Routing of the instances that became a detector's predictions (opt-in prediction fields)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .routing import Routing


def routing_of_predictions(
    routing: Routing, counts: Sequence[int], prediction_rows: Sequence[torch.Tensor]
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the experts and weights of the instances that became predictions.

    Args:
        routing: the routing of all images' instances, image after image (``counts[i]`` rows
            for image i).
        counts: instances per image.
        prediction_rows: per image, (n_i,) long, the instance (within that image's instances)
            each prediction came from.
    Returns:
        per image ``(expert_index (n_i, k) long, combine_weight (n_i, k) float32)``.
    """
    if sum(counts) != routing.expert_index.shape[0] or len(counts) != len(prediction_rows):
        raise ValueError(
            f"routing of {routing.expert_index.shape[0]} instances does not match counts {list(counts)} "
            f"of {len(prediction_rows)} images"
        )
    out = []
    start = 0
    for count, rows in zip(counts, prediction_rows):
        rows = rows.to(routing.expert_index.device, torch.long) + start
        out.append((routing.expert_index[rows], routing.combine_weight[rows].float()))
        start += count
    return out
