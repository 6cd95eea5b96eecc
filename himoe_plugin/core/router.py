"""Hierarchical router: scene-level expert subsets, then instance-level top-k inside them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig, MoEConfigError
from .dispatch import DispatchPlan, build_dispatch_plan
from .distributed import global_sum
from .export_dispatch import exporting
from .losses import logsumexp_squared_sum, scene_supervision_loss, switch_balance_loss

LOSS_BALANCE = "loss_moe_balance"
LOSS_SCENE_BALANCE = "loss_moe_scene_balance"
LOSS_Z = "loss_moe_z"
LOSS_SCENE_SUPERVISION = "loss_moe_scene_supervision"


@dataclass
class SceneRouting:
    """Scene-level routing of B images over G expert groups (all float32).

    Attributes:
        logits: (B, G) scene-router logits (with training noise, before the temperature).
        log_probs: (B, G) log of the scene distribution.
        groups: (B, k_s) long, groups kept for each image, best first.
        kept: (B, G) bool, the same as a mask.
        eligible: (B, E) bool, experts inside each image's subset.
    """

    logits: torch.Tensor
    log_probs: torch.Tensor
    groups: torch.Tensor
    kept: torch.Tensor
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
        scene_groups: (B, k_s) long, groups kept for each image.
        eligible: (B, E) bool, experts inside each image's subset.
        plan: how to run the experts sparsely.
        scene: the scene-level routing (reusable by a later router, see ``forward``).
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


#: What a router can take from another router instead of computing it (``reuse_routing``): the
#: scene subsets, or the whole routing of every instance (its scene subset and its experts).
REUSABLE_PARTS = ("scene", "instance")


def stage_reuse(
    route_once: str, stage: int, routings: Sequence[Routing], rows: Optional[torch.Tensor]
) -> Dict[str, object]:
    """How stage ``stage`` of a cascade that routes once reuses the earlier stages' routing:
    the keyword arguments of its ``MoEBlock`` (``scene=`` or ``routing=``; none for stage 0 or
    ``route_once=""``).

    Args:
        route_once: ``""``, ``"scene"`` or ``"instance"`` (``ROUTE_ONCE_MODES``).
        stage: the stage about to run.
        routings: the routings of the stages run so far, stage 0 first.
        rows: (M,) long, the previous stage's RoIs the M RoIs of this stage come from (training
            drops or resamples them); None: the same RoIs, in the same order.
    """
    if stage == 0 or not route_once:
        return {}
    if route_once == "scene":
        return {"scene": routings[0].scene}
    previous = routings[-1]
    return {"routing": previous if rows is None else previous.select(rows)}


class HierarchicalRouter(nn.Module):
    """Scene router over pooled image features + instance router over per-instance features.

    Instance routing distribution for instance i of image b over experts e of group g(e)::

        p(e | i) = softmax_e( instance_logit(i, e) + log p_scene(g(e) | b) ),  e eligible for b

    so the scene distribution acts as a prior and both routers receive the task gradient
    through the combine weights (as long as an image keeps more than one group). Without an
    instance router (``instance_router=False``, scene-only routing) the instance logits are 0
    and every instance of an image gets the same experts.
    Both routers see layer-normalised inputs (as MoE layers in transformers do), so that
    routing starts near-uniform whatever the scale of detection features.
    All router math runs in float32, also under autocast.

    ``num_groups`` and ``num_experts`` are saved as buffers: loading a checkpoint routed over
    another number of groups or experts fails naming the setting (``key_of(field)``), instead
    of a checkpointer silently skipping the shape-mismatched router weights.
    """

    def __init__(
        self,
        config: MoEConfig,
        scene_dim: int,
        instance_dim: int,
        key_of: Callable[[str], str] = str,
    ):
        super().__init__()
        self.config = config
        self.key_of = key_of
        self.scene_norm = nn.LayerNorm(scene_dim, elementwise_affine=False)
        self.scene_router = nn.Linear(scene_dim, config.groups)
        self.instance_norm: Optional[nn.LayerNorm] = None
        self.instance_router: Optional[InstanceRouterLinear] = None
        if config.instance_router:
            self.instance_norm = nn.LayerNorm(instance_dim, elementwise_affine=False)
            scene_input = config.groups if config.instance_uses_scene_probs else 0
            self.instance_router = InstanceRouterLinear(instance_dim + scene_input, config.num_experts)
        self.register_buffer(
            "expert_group",
            torch.arange(config.num_experts) // config.experts_per_group,
            persistent=False,
        )
        self.register_buffer("num_groups", torch.tensor(config.groups), persistent=True)
        self.reused = ""
        self.reset_parameters()

    def reuse_routing(self, part: str) -> None:
        """Take ``part`` of every routing from another router instead of computing it, and drop
        the modules that would compute it (they would otherwise sit unused, which DDP rejects).

        ``'scene'``: the scene subsets come from ``forward(scene=...)``; this router keeps its
        instance router. ``'instance'``: the owning ``MoEBlock`` is always given the whole
        ``Routing`` and never calls this router. Used by the later stages of a cascade that
        routes once (stage 0 routes, later stages reuse).
        """
        if part not in REUSABLE_PARTS:
            raise ValueError(f"reuse_routing: part={part!r}, expected one of {REUSABLE_PARTS}")
        self.scene_router = None
        if part == "instance":
            self.instance_router = self.instance_norm = None
        self.reused = part

    def _reused_error(self) -> RuntimeError:
        return RuntimeError(
            f"this router reuses the {self.reused} routing of another one (reuse_routing): "
            "pass that routing in (scene=... to the router, routing=... to its MoEBlock)"
        )

    def reset_parameters(self) -> None:
        """Near-neutral start: logits of std ~0.1 on normalised inputs, zero bias."""
        for linear in (self.scene_router, self.instance_router):
            if linear is not None:
                nn.init.normal_(linear.weight, std=0.1 / linear.in_features**0.5)
                nn.init.zeros_(linear.bias)

    def route_scene(self, scene_features: torch.Tensor) -> SceneRouting:
        """(B, C_scene) pooled image features -> the scene subsets of the B images."""
        if self.reused:
            raise self._reused_error()
        cfg = self.config
        with torch.autocast(device_type=scene_features.device.type, enabled=False):
            logits = _linear_fp32(self.scene_router, self.scene_norm(scene_features.float()))
            if self.training and cfg.scene_noise_std > 0:
                logits = logits + torch.randn_like(logits) * cfg.scene_noise_std
            log_probs = F.log_softmax(logits / cfg.scene_temperature, dim=-1)
            groups = log_probs.topk(cfg.scene_top_k, dim=-1).indices
            kept = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(
                1, groups, torch.ones_like(groups, dtype=torch.bool)
            )  # a tensor source (not True) keeps the op traceable for FLOP counters
        return SceneRouting(logits, log_probs, groups, kept, kept[:, self.expert_group])

    def forward(
        self,
        scene_features: Optional[torch.Tensor],
        instance_features: torch.Tensor,
        image_index: torch.Tensor,
        scene_targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        counted: Optional[torch.Tensor] = None,
        scene: Optional[SceneRouting] = None,
    ) -> Routing:
        """Route.

        Args:
            scene_features: (B, C_scene) one pooled descriptor per image (unused, may be None,
                when ``scene`` is given).
            instance_features: (N, C_inst) one feature per instance (N may be 0).
            image_index: (N,) long, image of each instance.
            scene_targets: optional ``(targets (B, G), has_target (B,))`` for super-class
                supervision of the scene router (see ``scene_targets_from_labels``).
            counted: optional (N,) bool, the instances that enter the balance and z losses
                and the statistics (e.g. not DETR denoising queries); all when None. Every
                instance is routed either way.
            scene: a scene routing to reuse (computed by another router, e.g. an earlier
                cascade stage). Its scene-level losses and statistics belong to that router,
                so this one adds only instance-level ones.
        """
        cfg = self.config
        if self.reused == "instance":
            raise self._reused_error()
        owns_scene = scene is None
        if owns_scene:
            scene = self.route_scene(scene_features)
        if scene.kept.shape[1] != cfg.groups:
            raise ValueError(
                f"the reused scene routing has {scene.kept.shape[1]} groups, this router {cfg.groups}"
            )
        with torch.autocast(device_type=instance_features.device.type, enabled=False):
            scene_probs = scene.probs
            instance_logits = self._instance_logits(instance_features, scene_probs, image_index)
            prior = scene.log_probs[image_index][:, self.expert_group]
            joint = (prior if instance_logits is None else instance_logits + prior)
            joint = joint.masked_fill(~scene.eligible[image_index], float("-inf"))
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
            scene_groups=scene.groups,
            eligible=scene.eligible,
            plan=plan,
            scene=scene,
        )
        self._account(routing, instance_logits, counted, owns_scene)
        if self.training and owns_scene and cfg.scene_supervision_weight > 0 and scene_targets is not None:
            targets, has_target = scene_targets
            routing.losses[LOSS_SCENE_SUPERVISION] = cfg.scene_supervision_weight * (
                scene_supervision_loss(scene.log_probs, targets.float(), has_target)
            )
        return routing

    def _instance_logits(
        self, instance_features: torch.Tensor, scene_probs: torch.Tensor, image_index: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """(N, E) logits of ``[x, scene_probs[image]]`` (None without an instance router)."""
        if self.instance_router is None:
            return None
        cfg = self.config
        x = self.instance_norm(instance_features.float())
        if self.training and cfg.instance_jitter > 0:
            eps = cfg.instance_jitter
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        if cfg.instance_uses_scene_probs:
            return self.instance_router(x, scene_probs, image_index)
        return self.instance_router(x)

    def _account(
        self,
        routing: Routing,
        instance_logits: Optional[torch.Tensor],
        counted: Optional[torch.Tensor],
        owns_scene: bool,
    ) -> None:
        """Fill ``routing.losses`` (training) and ``routing.statistics`` from one packed vector.

        In training with ``global_balance`` the vector is summed over data-parallel ranks in a
        single collective, issued on every rank every step (also with zero instances).
        Nothing under tracing or export: losses and statistics stay out of exported graphs.
        """
        if exporting():
            return
        cfg = self.config
        num_experts, groups = cfg.num_experts, cfg.groups
        probs = routing.instance_probs
        expert_index = routing.expert_index
        kept = routing.plan.kept
        scene = routing.scene
        with torch.autocast(device_type=probs.device.type, enabled=False):
            if counted is not None:
                probs, expert_index, kept = probs[counted], expert_index[counted], kept[counted]
                if instance_logits is not None:
                    instance_logits = instance_logits[counted]
            assignment_counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).float()
            with torch.no_grad():
                entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
                dropped = (~kept).sum().float()
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
                [scene.kept.float().sum(dim=0), scene.probs.sum(dim=0)]
                if owns_scene
                else [probs.new_zeros(groups), probs.new_zeros(groups)]
            )
            packed = torch.cat([assignment_counts, probs.sum(dim=0), *scene_part, scalars])
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
                if owns_scene and cfg.scene_balance_loss_weight > 0:
                    losses[LOSS_SCENE_BALANCE] = cfg.scene_balance_loss_weight * switch_balance_loss(
                        group_counts / (images * cfg.scene_top_k), scene_prob_sums / images
                    )
                if cfg.z_loss_weight > 0:
                    losses[LOSS_Z] = cfg.z_loss_weight * (z_instance / instances + z_scene / images)

            routing.statistics = {
                "expert_load": expert_load.detach(),
                "routing_entropy": (entropy / instances).detach(),
                "dropped_fraction": (dropped / num_assignments).detach(),
                "unused_experts": (counts == 0).sum().float().detach(),
                "instances_per_image": (num_instances / images).detach(),
            }
            if owns_scene:
                routing.statistics["group_usage"] = (group_counts / images).detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "num_groups"
        if key in state_dict:
            saved = int(state_dict[key])
            if saved != self.config.groups:
                raise MoEConfigError(
                    self.key_of("num_groups"), self.config.num_groups,
                    f"the checkpoint's router at '{prefix[:-1]}' chooses among {saved} expert "
                    f"groups but this model's among {self.config.groups}; set it to match the "
                    "checkpoint (0 means one group per expert)",
                )
        else:  # checkpoints written before the buffer existed: shapes were the only record
            state_dict[key] = self.num_groups.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class InstanceRouterLinear(nn.Linear):
    """The instance router's linear layer over ``[x, scene_probs[image_index]]``, in float32.

    Computed without building the concatenation: ``W[:, :C] x + b + (W[:, C:] scene_probs)[image]``
    (the per-image term once per image). Called as a module, so FLOP counters and hooks see it.
    """

    def forward(
        self,
        x: torch.Tensor,
        scene_probs: Optional[torch.Tensor] = None,
        image_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (N, C); scene_probs: (B, G) or None (then ``in_features == C``); image_index: (N,).
        Returns (N, out_features) float32 logits."""
        weight, bias = self.weight.float(), self.bias.float()
        if scene_probs is None:
            return F.linear(x.float(), weight, bias)
        feature_dim = x.shape[1]
        per_image = F.linear(scene_probs.float(), weight[:, feature_dim:])  # (B, E)
        # A contiguous slice: its weight gradient is computed 2-3x faster than a strided view's.
        return F.linear(x.float(), weight[:, :feature_dim].contiguous(), bias) + per_image[image_index]


def _linear_fp32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` computed in float32 whatever the module's or input's dtype. A float32 module
    is called as a module, so FLOP counters and hooks see it (mmdet's get_flops.py, fvcore)."""
    if linear.weight.dtype == torch.float32:
        return linear(x.float())
    return F.linear(x.float(), linear.weight.float(), linear.bias.float())
