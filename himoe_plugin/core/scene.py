"""What the HI-MoE ROI heads of both frameworks check around the scene router: the feature
levels it pools and the class -> expert group map of super-class supervision."""
from __future__ import annotations

from typing import Any, List, Sequence

import torch

from .config import MoEConfigError


def check_scene_strides(strides: Any, key: str) -> List[int]:
    """``strides`` of the feature levels the scene router pools, as a non-empty list of positive
    integers; errors name ``key``."""
    if isinstance(strides, (str, bytes)) or not isinstance(strides, Sequence) or not strides or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides
    ):
        raise MoEConfigError(key, strides, "must be a non-empty list of positive integer strides")
    return [int(s) for s in strides]


def check_class_groups(class_to_group: Sequence[int], num_classes: int, num_groups: int) -> torch.Tensor:
    """(num_classes,) long: the expert group (supercategory index) of every class, each in
    ``[0, num_groups)``; ValueError otherwise."""
    groups = torch.as_tensor(list(class_to_group), dtype=torch.long)
    if groups.shape != (num_classes,) or groups.min() < 0 or groups.max() >= num_groups:
        raise ValueError(
            f"class_to_group needs one group in [0, {num_groups}) for each of the {num_classes} "
            f"classes, got {groups.tolist()}"
        )
    return groups
