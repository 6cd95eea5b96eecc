"""Routing losses and statistics of one routing, from one packed vector summed over ranks.

``account_routing`` is a pure function: mask the counted instances, pack every sum the losses
and statistics need into one vector, all-reduce it once (one collective per MoE block per
training step, on every rank, also with zero instances), unpack. The losses it returns are
unweighted: Detectron2 weights them with ``weighted_losses`` (``MoEConfig`` weights), each
MMDetection loss module with its own ``loss_weight``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .config import MoEConfig
from .distributed import global_sum
from .losses import logsumexp_squared_sum, switch_balance_loss
from .routing import Routing

LOSS_BALANCE = "loss_moe_balance"
LOSS_SCENE_BALANCE = "loss_moe_scene_balance"
LOSS_Z = "loss_moe_z"
LOSS_SCENE_SUPERVISION = "loss_moe_scene_supervision"

#: The ``MoEConfig`` field that weights each routing loss (see ``weighted_losses``).
LOSS_WEIGHT_FIELDS = {
    LOSS_BALANCE: "balance_loss_weight",
    LOSS_SCENE_BALANCE: "scene_balance_loss_weight",
    LOSS_Z: "z_loss_weight",
    LOSS_SCENE_SUPERVISION: "scene_supervision_weight",
}


def weighted_losses(losses: Dict[str, torch.Tensor], config: MoEConfig) -> Dict[str, torch.Tensor]:
    """``weight * term`` of every unweighted routing loss whose ``MoEConfig`` weight is > 0."""
    out = {}
    for name, value in losses.items():
        weight = getattr(config, LOSS_WEIGHT_FIELDS[name])
        if weight > 0:
            out[name] = weight * value
    return out


def account_routing(
    routing: Routing,
    instance_logits: Optional[torch.Tensor],
    counted: Optional[torch.Tensor],
    owns_scene: bool,
    config: MoEConfig,
    with_losses: bool,
    sum_over_ranks: bool,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The unweighted routing losses and the statistics of ``routing``.

    Args:
        routing: the routing of N instances (its scene part is counted only if ``owns_scene``).
        instance_logits: (N, E) instance-router logits (z-loss), None without instance router.
        counted: optional (N,) bool, the instances that enter losses and statistics; all if None.
        owns_scene: the scene routing was computed for this routing (not reused from another
            router, whose losses and statistics hold the scene part).
        config: the router's settings (experts, groups, top-k).
        with_losses: compute the losses (training); else ``{}``.
        sum_over_ranks: sum the packed vector over data-parallel ranks (one collective).
    Returns:
        ``(losses, statistics)``: losses ``LOSS_BALANCE`` and ``LOSS_Z`` (plus
        ``LOSS_SCENE_BALANCE`` with ``owns_scene``), scalars with a graph; statistics detached:
        ``expert_load`` (E,), ``routing_entropy``, ``dropped_fraction``, ``unused_experts``,
        ``instances_per_image`` and, with ``owns_scene``, ``group_usage`` (G,).
    """
    num_experts, groups = config.num_experts, config.groups
    probs = routing.instance_probs
    expert_index = routing.expert_index
    within_capacity = routing.plan.within_capacity
    scene = routing.scene
    with torch.autocast(device_type=probs.device.type, enabled=False):
        if counted is not None:
            probs, expert_index = probs[counted], expert_index[counted]
            within_capacity = within_capacity[counted]
            if instance_logits is not None:
                instance_logits = instance_logits[counted]
        assignment_counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).float()
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
            dropped = (~within_capacity).sum().float()
        zero = probs.new_zeros(())
        scalars = torch.stack(
            [
                probs.new_full((), float(probs.shape[0])),  # a fill: no host-to-device copy
                probs.new_full((), float(scene.logits.shape[0])) if owns_scene else zero,
                dropped,
                entropy,
                zero if instance_logits is None else logsumexp_squared_sum(instance_logits),
                logsumexp_squared_sum(scene.logits) if owns_scene else zero,
            ]
        )
        scene_part = (
            [scene.group_mask.float().sum(dim=0), scene.probs.sum(dim=0)]
            if owns_scene
            else [probs.new_zeros(groups), probs.new_zeros(groups)]
        )
        packed = torch.cat([assignment_counts, probs.sum(dim=0), *scene_part, scalars])
        if sum_over_ranks:
            packed = global_sum(packed)
        counts, prob_sums, group_counts, scene_prob_sums, scalars = torch.split(
            packed, [num_experts, num_experts, groups, groups, scalars.numel()]
        )
        num_instances, num_images, dropped, entropy, z_instance, z_scene = scalars.unbind()
        num_assignments = (num_instances * config.top_k).clamp_min(1.0)
        instances = num_instances.clamp_min(1.0)
        images = num_images.clamp_min(1.0)
        expert_load = counts / num_assignments

        losses: Dict[str, torch.Tensor] = {}
        if with_losses:
            losses[LOSS_BALANCE] = switch_balance_loss(expert_load, prob_sums / instances)
            if owns_scene:
                losses[LOSS_SCENE_BALANCE] = switch_balance_loss(
                    group_counts / (images * config.scene_top_k), scene_prob_sums / images
                )
            losses[LOSS_Z] = z_instance / instances + z_scene / images

        statistics = {
            "expert_load": expert_load.detach(),
            "routing_entropy": (entropy / instances).detach(),
            "dropped_fraction": (dropped / num_assignments).detach(),
            "unused_experts": (counts == 0).sum().float().detach(),
            "instances_per_image": (num_instances / images).detach(),
        }
        if owns_scene:
            statistics["group_usage"] = (group_counts / images).detach()
    return losses, statistics
