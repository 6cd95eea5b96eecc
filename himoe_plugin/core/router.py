"""Hierarchical router: scene-level expert subsets, then instance-level top-k inside them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .dispatch import DispatchPlan, build_dispatch_plan
from .distributed import global_sum
from .losses import logsumexp_squared_sum, scene_supervision_loss, switch_balance_loss

LOSS_BALANCE = "loss_moe_balance"
LOSS_SCENE_BALANCE = "loss_moe_scene_balance"
LOSS_Z = "loss_moe_z"
LOSS_SCENE_SUPERVISION = "loss_moe_scene_supervision"


@dataclass
class Routing:
    """Routing of N instances from B images over E experts in G groups.

    Attributes:
        expert_index: (N, k) long, chosen experts per instance, best first.
        combine_weight: (N, k) float32, renormalised over the k choices; 0 where the
            assignment was dropped by the capacity limit.
        instance_probs: (N, E) float32, routing distribution over the image's eligible
            experts (0 elsewhere).
        scene_probs: (B, G) float32, scene-router distribution over groups.
        scene_groups: (B, k_s) long, groups kept for each image.
        eligible: (B, E) bool, experts inside each image's subset.
        plan: how to run the experts sparsely.
        losses: weighted auxiliary losses, keys start with ``loss_`` (training only).
        statistics: detached tensors for logging (global over ranks when configured).
    """

    expert_index: torch.Tensor
    combine_weight: torch.Tensor
    instance_probs: torch.Tensor
    scene_probs: torch.Tensor
    scene_groups: torch.Tensor
    eligible: torch.Tensor
    plan: DispatchPlan
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    statistics: Dict[str, torch.Tensor] = field(default_factory=dict)


class HierarchicalRouter(nn.Module):
    """Scene router over pooled image features + instance router over per-instance features.

    Instance routing distribution for instance i of image b over experts e of group g(e)::

        p(e | i) = softmax_e( instance_logit(i, e) + log p_scene(g(e) | b) ),  e eligible for b

    so the scene distribution acts as a prior and both routers receive the task gradient
    through the combine weights (as long as an image keeps more than one group).
    Both routers see layer-normalised inputs (as MoE layers in transformers do), so that
    routing starts near-uniform whatever the scale of detection features.
    All router math runs in float32, also under autocast.
    """

    def __init__(self, config: MoEConfig, scene_dim: int, instance_dim: int):
        super().__init__()
        self.config = config
        self.scene_norm = nn.LayerNorm(scene_dim, elementwise_affine=False)
        self.instance_norm = nn.LayerNorm(instance_dim, elementwise_affine=False)
        self.scene_router = nn.Linear(scene_dim, config.groups)
        scene_input = config.groups if config.instance_uses_scene_probs else 0
        self.instance_router = nn.Linear(instance_dim + scene_input, config.num_experts)
        self.register_buffer(
            "expert_group",
            torch.arange(config.num_experts) // config.experts_per_group,
            persistent=False,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Near-neutral start: logits of std ~0.1 on normalised inputs, zero bias."""
        for linear in (self.scene_router, self.instance_router):
            nn.init.normal_(linear.weight, std=0.1 / linear.in_features**0.5)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        scene_features: torch.Tensor,
        instance_features: torch.Tensor,
        image_index: torch.Tensor,
        scene_targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Routing:
        """Route.

        Args:
            scene_features: (B, C_scene) one pooled descriptor per image.
            instance_features: (N, C_inst) one feature per instance (N may be 0).
            image_index: (N,) long, image of each instance.
            scene_targets: optional ``(targets (B, G), has_target (B,))`` for super-class
                supervision of the scene router (see ``scene_targets_from_labels``).
        """
        cfg = self.config
        with torch.autocast(device_type=scene_features.device.type, enabled=False):
            scene_logits = _linear_fp32(self.scene_router, self.scene_norm(scene_features.float()))
            if self.training and cfg.scene_noise_std > 0:
                scene_logits = scene_logits + torch.randn_like(scene_logits) * cfg.scene_noise_std
            scene_log_probs = F.log_softmax(scene_logits / cfg.scene_temperature, dim=-1)
            scene_probs = scene_log_probs.exp()
            scene_groups = scene_log_probs.topk(cfg.scene_top_k, dim=-1).indices
            group_kept = torch.zeros_like(scene_probs, dtype=torch.bool).scatter_(
                1, scene_groups, torch.ones_like(scene_groups, dtype=torch.bool)
            )  # a tensor source (not True) keeps the op traceable for FLOP counters
            eligible = group_kept[:, self.expert_group]

            x = self.instance_norm(instance_features.float())
            if self.training and cfg.instance_jitter > 0:
                eps = cfg.instance_jitter
                x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
            instance_logits = self._instance_logits(x, scene_probs, image_index)
            prior = scene_log_probs[image_index][:, self.expert_group]
            joint = (instance_logits + prior).masked_fill(~eligible[image_index], float("-inf"))
            instance_probs = F.softmax(joint, dim=-1)
            top_probs, expert_index = instance_probs.topk(cfg.top_k, dim=-1)
            if cfg.top_k == 1:
                # Renormalised, a single weight is exactly 1 and has zero gradient, so the task
                # would never train the routers. Keep the value 1 (dense equivalence at upcycling)
                # and pass the gradient of log p: straight-through.
                combine_weight = top_probs / top_probs.detach()
            else:
                combine_weight = top_probs / top_probs.sum(dim=-1, keepdim=True)

        plan = build_dispatch_plan(
            expert_index,
            combine_weight,
            top_probs,
            cfg.num_experts,
            capacity=cfg.capacity(expert_index.shape[0]),
        )
        routing = Routing(
            expert_index=expert_index,
            combine_weight=combine_weight * plan.kept,
            instance_probs=instance_probs,
            scene_probs=scene_probs,
            scene_groups=scene_groups,
            eligible=eligible,
            plan=plan,
        )
        self._account(routing, instance_logits, scene_logits, group_kept)
        if self.training and cfg.scene_supervision_weight > 0 and scene_targets is not None:
            targets, has_target = scene_targets
            routing.losses[LOSS_SCENE_SUPERVISION] = cfg.scene_supervision_weight * (
                scene_supervision_loss(scene_log_probs, targets.float(), has_target)
            )
        return routing

    def _instance_logits(
        self, x: torch.Tensor, scene_probs: torch.Tensor, image_index: torch.Tensor
    ) -> torch.Tensor:
        """(N, E) logits of ``[x, scene_probs[image]]`` without materialising the concatenation."""
        weight = self.instance_router.weight.float()
        bias = self.instance_router.bias.float()
        if not self.config.instance_uses_scene_probs:
            return F.linear(x, weight, bias)
        feature_dim = x.shape[1]
        per_image = F.linear(scene_probs, weight[:, feature_dim:])  # (B, E)
        return F.linear(x, weight[:, :feature_dim], bias) + per_image[image_index]

    def _account(
        self,
        routing: Routing,
        instance_logits: torch.Tensor,
        scene_logits: torch.Tensor,
        group_kept: torch.Tensor,
    ) -> None:
        """Fill ``routing.losses`` (training) and ``routing.statistics`` from one packed vector.

        In training with ``global_balance`` the vector is summed over data-parallel ranks in a
        single collective, issued on every rank every step (also with zero instances).
        """
        cfg = self.config
        num_experts, groups = cfg.num_experts, cfg.groups
        probs = routing.instance_probs
        with torch.autocast(device_type=probs.device.type, enabled=False):
            assignment_counts = torch.bincount(
                routing.expert_index.reshape(-1), minlength=num_experts
            ).float()
            with torch.no_grad():
                entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
                dropped = (~routing.plan.kept).sum().float()
            scalars = torch.stack(
                [
                    probs.new_full((), float(probs.shape[0])),  # a fill: no host-to-device copy
                    probs.new_full((), float(scene_logits.shape[0])),
                    dropped,
                    entropy,
                    logsumexp_squared_sum(instance_logits),
                    logsumexp_squared_sum(scene_logits),
                ]
            )
            packed = torch.cat(
                [
                    assignment_counts,
                    probs.sum(dim=0),
                    group_kept.float().sum(dim=0),
                    routing.scene_probs.sum(dim=0),
                    scalars,
                ]
            )
            if self.training and cfg.global_balance:
                packed = global_sum(packed)
            counts, prob_sums, group_counts, scene_prob_sums, scalars = torch.split(
                packed, [num_experts, num_experts, groups, groups, scalars.numel()]
            )
            num_instances, num_images, dropped, entropy, z_instance, z_scene = scalars.unbind()
            num_assignments = (num_instances * cfg.top_k).clamp_min(1.0)
            instances = num_instances.clamp_min(1.0)
            images = num_images.clamp_min(1.0)
            expert_load = counts / num_assignments

            if self.training:
                losses = routing.losses
                if cfg.balance_loss_weight > 0:
                    losses[LOSS_BALANCE] = cfg.balance_loss_weight * switch_balance_loss(
                        expert_load, prob_sums / instances
                    )
                if cfg.scene_balance_loss_weight > 0:
                    losses[LOSS_SCENE_BALANCE] = cfg.scene_balance_loss_weight * switch_balance_loss(
                        group_counts / (images * cfg.scene_top_k), scene_prob_sums / images
                    )
                if cfg.z_loss_weight > 0:
                    losses[LOSS_Z] = cfg.z_loss_weight * (z_instance / instances + z_scene / images)

            routing.statistics = {
                "expert_load": expert_load.detach(),
                "group_usage": (group_counts / images).detach(),
                "routing_entropy": (entropy / instances).detach(),
                "dropped_fraction": (dropped / num_assignments).detach(),
                "unused_experts": (counts == 0).sum().float().detach(),
                "instances_per_image": (num_instances / images).detach(),
            }


def _linear_fp32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` computed in float32 whatever the module's or input's dtype."""
    return F.linear(x.float(), linear.weight.float(), linear.bias.float())
