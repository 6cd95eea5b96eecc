"""``MoEBlock``: one HI-MoE layer, route -> dispatch -> experts (+ shared) -> statistics.

Every framework adapter (box heads, DETR FFNs) wraps this block and only translates shapes and
configs: the router, the experts, the statistics meter, the checkpoint guards and upcycling all
live here.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import MoEConfig
from .experts import MoEMLP
from .export_dispatch import exporting
from .guards import check_block_checkpoint
from .router import HierarchicalRouter
from .routing import Routing, SceneRouting
from .stats import RoutingStatsMeter
from .upcycle import upcycle_state_dict

logger = logging.getLogger("himoe_plugin")

#: Warn when the capacity limit drops more than this fraction of a step's assignments.
DROP_WARNING_FRACTION = 0.5
#: ... at most once per this many training steps of a block.
DROP_WARNING_EVERY = 100


class MoEBlock(nn.Module):
    """Hierarchical router + sparse experts (+ optional shared expert) of one layer.

    Children (checkpoint keys): ``router`` (``HierarchicalRouter``) and ``moe`` (``MoEMLP``:
    ``moe.experts.weights.<l>`` (E, out, in), ``moe.experts.biases.<l>``, ``moe.shared.*``,
    ``moe.num_experts``). In training, every forward adds its routing statistics to the block's
    ``statistics`` meter (on device; read out by ``collect_routing_statistics``).

    Args:
        router: the hierarchical router; its ``config`` sets the experts (count, shared expert)
            and its ``config_keys`` name settings in errors.
        dims: expert MLP widths ``[in, hidden..., out]``.
        activate_output: ReLU after the experts' last layer (box-head fc layers) or not
            (transformer FFNs).
        stats_scope: name of this block in logged statistics (``himoe/<scope>/...``); empty:
            the block's module path when a model has several blocks.
        shared_dims: widths of the shared expert, if any (default: ``dims``).
        hidden_dropout: dropout after the experts' hidden activations (training only).
    """

    def __init__(
        self,
        router: HierarchicalRouter,
        dims: Sequence[int],
        activate_output: bool = True,
        stats_scope: str = "",
        shared_dims: Optional[Sequence[int]] = None,
        hidden_dropout: float = 0.0,
    ):
        super().__init__()
        config = router.config
        self.router = router
        self.moe = MoEMLP(
            config.num_experts,
            dims,
            shared_expert=config.shared_expert,
            shared_expert_weight=config.shared_expert_weight,
            activate_output=activate_output,
            num_experts_key=router.key("num_experts"),
            shared_dims=shared_dims,
            hidden_dropout=hidden_dropout,
            expert_backend=config.expert_backend,
            expert_backend_key=router.key("expert_backend"),
        )
        self.stats_scope = stats_scope
        self.statistics = RoutingStatsMeter()
        self._steps_since_drop_warning = DROP_WARNING_EVERY

    @property
    def config(self) -> MoEConfig:
        return self.router.config

    @property
    def dims(self) -> Tuple[int, ...]:
        return self.moe.dims

    def forward(
        self,
        x: torch.Tensor,
        scene_features: Optional[torch.Tensor],
        image_index: torch.Tensor,
        router_input: Optional[torch.Tensor] = None,
        scene_targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        counted: Optional[torch.Tensor] = None,
        scene: Optional[SceneRouting] = None,
        routing: Optional[Routing] = None,
    ) -> Tuple[torch.Tensor, Routing]:
        """Route every instance and run only its top-k experts.

        Args:
            x: (N, dims[0]) instances (RoI features, tokens, object queries) of all images.
            scene_features: (B, C_scene) one descriptor per image (None if ``scene`` is given).
            image_index: (N,) long, image of each instance.
            router_input: (N, C_route) what the instance router sees; None: ``x``.
            scene_targets: optional super-class targets ``(targets (B, G), has_target (B,))``.
            counted: optional (N,) bool, instances that enter balance losses and statistics
                (all are routed and computed).
            scene: a scene routing to reuse instead of routing ``scene_features``.
            routing: the whole routing of these N instances, computed by another block (e.g.
                stage 0 of a cascade that routes once): the experts run on it and this block
                routes nothing; its losses and statistics belong to the block that routed.
        Returns:
            (N, dims[-1]) outputs and the ``Routing`` (``losses`` in training).
        """
        if routing is not None:
            return self.moe(x, routing.plan), routing
        routing = self.router(
            scene_features,
            x if router_input is None else router_input,
            image_index,
            scene_targets=scene_targets,
            counted=counted,
            scene=scene,
        )
        y = self.moe(x, routing.plan)
        if self.training and not exporting():  # statistics stay out of exported graphs
            self.statistics.update(routing.statistics)
            self._warn_if_dropping(routing)
        return y, routing

    def upcycle(
        self,
        state_dict: Dict[str, torch.Tensor],
        block_prefix: str,
        dense_prefixes: Sequence[str],
        mode: str = "copy",
        noise_std: float = 0.0,
    ) -> List[str]:
        """Map a dense checkpoint's layers ``dense_prefixes`` (full key prefixes) onto this
        block's experts, in place (see ``upcycle_state_dict``); returns the report.

        Adapters call it from their ``_load_from_state_dict`` before loading, with
        ``block_prefix`` the key prefix of this block (ending in '.').
        """
        return upcycle_state_dict(
            state_dict, dense_prefixes, block_prefix + "moe.", self.moe, mode=mode, noise_std=noise_std
        )

    @staticmethod
    def adopt_flat_keys(state_dict: Dict[str, torch.Tensor], owner_prefix: str, block_name: str) -> None:
        """Move ``<owner>router.*`` / ``<owner>moe.*`` keys to ``<owner><block_name>.*``, in place.

        Box-head checkpoints written before the block existed kept router and experts as direct
        children of the head; they load unchanged through this.
        """
        for child in ("router.", "moe."):
            old = owner_prefix + child
            for key in [k for k in state_dict if k.startswith(old)]:
                state_dict[f"{owner_prefix}{block_name}.{child}{key[len(old):]}"] = state_dict.pop(key)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_block_checkpoint(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _warn_if_dropping(self, routing: Routing) -> None:
        self._steps_since_drop_warning += 1
        plan = routing.plan
        routed = plan.num_instances * plan.top_k
        if plan.num_dropped == 0 or self._steps_since_drop_warning < DROP_WARNING_EVERY:
            return
        fraction = plan.num_dropped / routed
        if fraction > DROP_WARNING_FRACTION:
            self._steps_since_drop_warning = 0
            logger.warning(
                "HI-MoE%s: the capacity limit dropped %d of %d routed assignments (%.0f%%) in this "
                "step; dropped assignments contribute nothing. Raise %s=%s (0 = dropless).",
                f" {self.stats_scope}" if self.stats_scope else "",
                plan.num_dropped, routed, 100 * fraction,
                self.router.key("capacity_factor"), self.config.capacity_factor,
            )
