"""Hierarchical router (gating math only): scene-level expert subsets, then instance-level top-k
inside them."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .accounting import LOSS_SCENE_SUPERVISION, account_routing
from .config import MoEConfig, MoEConfigError
from .dispatch import build_dispatch_plan
from .export_dispatch import exporting
from .losses import scene_supervision_loss
from .routing import Routing, SceneRouting

#: What a router can take from another router instead of computing it (``reuse_routing``): the
#: scene subsets, or the whole routing of every instance (its scene subset and its experts).
REUSABLE_PARTS = ("scene", "instance")


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

    ``num_groups`` and ``instance_routing`` (``[instance_router, instance_uses_scene_probs]``)
    are saved as buffers: loading a checkpoint routed otherwise fails naming the setting,
    instead of a checkpointer silently skipping the shape-mismatched router weights.

    Args:
        config: the validated settings.
        scene_dim / instance_dim: widths of the scene features (B, C_scene) and of what the
            instance router sees (N, C_inst).
        config_keys: how the user's config names the settings (``MoEConfig`` fields and the
            adapter settings ``expert_dim``, ``route_once``), for errors; missing names are
            shown as they are.
    """

    def __init__(
        self,
        config: MoEConfig,
        scene_dim: int,
        instance_dim: int,
        config_keys: Optional[Mapping[str, str]] = None,
    ):
        super().__init__()
        self.config = config
        self.config_keys: Dict[str, str] = dict(config_keys or {})
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
        # What the instance router is (the guard of ``MoEBlock`` names the setting on a mismatch).
        self.register_buffer(
            "instance_routing",
            torch.tensor([int(config.instance_router), int(config.instance_uses_scene_probs)]),
            persistent=True,
        )
        self.reused = ""
        self.reset_parameters()

    def key(self, name: str) -> str:
        """The config key the user wrote for setting ``name``."""
        return self.config_keys.get(name, name)

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
            group_mask = torch.zeros_like(log_probs, dtype=torch.bool).scatter_(
                1, groups, torch.ones_like(groups, dtype=torch.bool)
            )  # a tensor source (not True) keeps the op traceable for FLOP counters
        return SceneRouting(logits, log_probs, groups, group_mask, group_mask[:, self.expert_group])

    def forward(
        self,
        scene_features: Optional[torch.Tensor],
        instance_features: torch.Tensor,
        image_index: torch.Tensor,
        scene_targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        counted: Optional[torch.Tensor] = None,
        scene: Optional[SceneRouting] = None,
    ) -> Routing:
        """Route N instances of B images.

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
        if scene.group_mask.shape[1] != cfg.groups:
            raise ValueError(
                f"the reused scene routing has {scene.group_mask.shape[1]} groups, this router {cfg.groups}"
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
            capacity=cfg.capacity(expert_index.shape[0], training=self.training),
        )
        routing = Routing(
            expert_index=expert_index,
            combine_weight=combine_weight * plan.within_capacity,
            instance_probs=instance_probs,
            scene_probs=scene_probs,
            scene_groups=scene.groups,
            eligible=scene.eligible,
            plan=plan,
            scene=scene,
        )
        if exporting():  # losses and statistics stay out of traced / exported graphs
            return routing
        routing.losses, routing.statistics = account_routing(
            routing, instance_logits, counted, owns_scene, cfg,
            with_losses=self.training, sum_over_ranks=self.training and cfg.global_balance,
        )
        if self.training and owns_scene and scene_targets is not None:
            targets, has_target = scene_targets
            routing.losses[LOSS_SCENE_SUPERVISION] = scene_supervision_loss(
                scene.log_probs, targets.float(), has_target
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "num_groups"
        saved = saved_group_count(state_dict, prefix)
        if saved is not None and saved != self.config.groups:
            raise MoEConfigError(
                self.key("num_groups"), self.config.num_groups,
                f"the checkpoint's router at '{prefix[:-1]}' chooses among {saved} expert "
                f"groups but this model's among {self.config.groups}; set it to match the "
                "checkpoint (0 means one group per expert)",
            )
        if key not in state_dict:  # checkpoints written before the buffers existed
            state_dict[key] = self.num_groups.clone()
        state_dict.setdefault(prefix + "instance_routing", self.instance_routing.clone())
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


def saved_group_count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Optional[int]:
    """The number of groups the router saved under ``prefix`` routes among: its ``num_groups``
    buffer, else (checkpoints written before the buffer) its scene router's output width; None
    when the state holds neither."""
    if prefix + "num_groups" in state_dict:
        return int(state_dict[prefix + "num_groups"])
    weight = state_dict.get(prefix + "scene_router.weight")
    return None if weight is None else int(weight.shape[0])
