"""What routing decided: the scene subsets of the images and the experts of every instance (data only)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

from .dispatch import DispatchPlan, build_dispatch_plan


@dataclass
class SceneRouting:
    """Scene-level routing of B images over G expert groups (all float32).

    Attributes:
        logits: (B, G) scene-router logits (with training noise, before the temperature).
        log_probs: (B, G) log of the scene distribution.
        groups: (B, k_s) long, the groups chosen for each image, best first.
        group_mask: (B, G) bool, the same as a mask.
        eligible: (B, E) bool, experts inside each image's subset.
    """

    logits: torch.Tensor
    log_probs: torch.Tensor
    groups: torch.Tensor
    group_mask: torch.Tensor
    eligible: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return self.log_probs.exp()


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
        scene_groups: (B, k_s) long, the groups chosen for each image.
        eligible: (B, E) bool, experts inside each image's subset.
        plan: how to run the experts sparsely.
        scene: the scene-level routing (reusable by a later router).
        losses: unweighted auxiliary losses (``LOSS_*`` names of ``accounting``; training only):
            the adapters weight them (``weighted_losses`` or their loss modules).
        statistics: detached tensors for logging (global over ranks when configured).
    """

    expert_index: torch.Tensor
    combine_weight: torch.Tensor
    instance_probs: torch.Tensor
    scene_probs: torch.Tensor
    scene_groups: torch.Tensor
    eligible: torch.Tensor
    plan: DispatchPlan
    scene: SceneRouting
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    statistics: Dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, rows: torch.Tensor) -> "Routing":
        """The routing of the instances ``rows`` (M,) long, in that order, with its own dispatch
        plan: e.g. the RoIs a cascade stage keeps of the previous stage's. Assignments the
        capacity limit dropped keep weight 0; losses and statistics stay with this routing."""
        expert_index = self.expert_index[rows]
        combine_weight = self.combine_weight[rows]
        plan = build_dispatch_plan(
            expert_index, combine_weight, combine_weight, self.plan.num_experts, capacity=0
        )
        return Routing(
            expert_index=expert_index,
            combine_weight=combine_weight,
            instance_probs=self.instance_probs[rows],
            scene_probs=self.scene_probs,
            scene_groups=self.scene_groups,
            eligible=self.eligible,
            plan=plan,
            scene=self.scene,
        )
