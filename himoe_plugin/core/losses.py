"""Auxiliary routing losses (all float32, all differentiable)."""
from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

import torch

from .config import MoEConfigError


def switch_balance_loss(assignment_fraction: torch.Tensor, mean_probability: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing ``n * sum_i f_i * P_i`` over n experts (or groups).

    Args:
        assignment_fraction: (n,) fraction of routed assignments per expert (counts, no grad).
        mean_probability: (n,) mean router probability per expert (carries the gradient).

    Equals 1 at perfectly uniform load and grows as load and probability mass concentrate.
    """
    n = assignment_fraction.numel()
    return n * torch.sum(assignment_fraction * mean_probability)


def logsumexp_squared_sum(logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``logsumexp(logits)^2`` (ST-MoE router z-loss before averaging).

    ``logits``: (n, E) -> scalar; 0 (with a graph) for n = 0.
    """
    return torch.logsumexp(logits, dim=-1).square().sum()


def read_coco_supercategories(json_file: str, category_ids: Optional[Sequence[int]] = None) -> List[str]:
    """Supercategory of every category of a COCO annotation file.

    Args:
        json_file: the COCO json.
        category_ids: the categories in label order; None: all, sorted by id (the order of
            Detectron2's contiguous ids).
    Raises ValueError naming the categories that have no supercategory.
    """
    with open(json_file) as f:
        categories = {c["id"]: c for c in json.load(f)["categories"]}
    ids = sorted(categories) if category_ids is None else list(category_ids)
    missing = [categories[i]["name"] for i in ids if "supercategory" not in categories[i]]
    if missing:
        raise ValueError(f"{json_file}: categories without a supercategory: {missing}")
    return [categories[i]["supercategory"] for i in ids]


def groups_of_supercategories(
    supercategories: Sequence[str], num_groups: int, num_groups_key: str
) -> List[int]:
    """Expert group of every class for super-class supervision: the index of the class's
    supercategory among the sorted distinct ones.

    Args:
        supercategories: one name per class, in class order.
        num_groups: the router's number of expert groups; must equal the number of distinct
            supercategories, else MoEConfigError naming ``num_groups_key``.
    """
    names = sorted(set(supercategories))
    if len(names) != num_groups:
        raise MoEConfigError(
            num_groups_key, num_groups,
            "super-class supervision needs one expert group per supercategory: the data has "
            f"{len(names)} ({', '.join(names)})",
        )
    return [names.index(s) for s in supercategories]


def scene_targets_from_labels(
    labels_per_image: Sequence[torch.Tensor], class_to_group: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft scene-router targets from ground-truth classes (Mobile V-MoE super-class guidance).

    Args:
        labels_per_image: B tensors of class ids (n_b,), long.
        class_to_group: (num_classes,) long, the expert group of each class (e.g. its
            supercategory index).
    Returns:
        targets: (B, G) float32, the normalised histogram of the image's groups.
        has_target: (B,) bool, False for images without ground truth (they get no loss).
    """
    device = class_to_group.device
    targets = torch.zeros(len(labels_per_image), num_groups, device=device)
    for b, labels in enumerate(labels_per_image):
        groups = class_to_group[labels.to(device=device, dtype=torch.long)]
        targets[b].index_add_(0, groups, torch.ones_like(groups, dtype=targets.dtype))
    totals = targets.sum(dim=1, keepdim=True)
    has_target = totals.squeeze(1) > 0
    return targets / totals.clamp_min(1.0), has_target


def scene_supervision_loss(
    scene_log_probs: torch.Tensor, targets: torch.Tensor, has_target: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy between soft targets (B, G) and scene log-probabilities (B, G).

    Averaged over images with a target; 0 (with a graph) when none has one.
    """
    per_image = -(targets * scene_log_probs).sum(dim=1) * has_target.to(scene_log_probs.dtype)
    return per_image.sum() / has_target.sum().clamp_min(1)
