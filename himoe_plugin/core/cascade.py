"""Cascades of HI-MoE heads: route-once modes, stage linking, and the routing of one pass
through the stages (held in the forward's locals, never on a module)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .block import MoEBlock
from .config import MoEConfigError
from .routing import Routing

#: ``route_once`` of cascade ROI heads: ``""`` every stage routes its RoIs itself; ``"scene"``
#: the later stages reuse stage 0's scene subsets; ``"instance"`` they reuse its whole routing
#: (each RoI keeps its experts through the stage-wise box refinement).
ROUTE_ONCE_MODES = ("", "scene", "instance")


def check_route_once(value: Any, key: str) -> str:
    """``value`` as one of ``ROUTE_ONCE_MODES`` (None means ``""``); errors name ``key``."""
    mode = "" if value is None else value
    if mode not in ROUTE_ONCE_MODES:
        raise MoEConfigError(key, value, f"must be one of {ROUTE_ONCE_MODES} (or None for '')")
    return mode


def link_cascade_stages(blocks: Sequence[MoEBlock], route_once: Optional[str], key: str) -> str:
    """Prepare the ``MoEBlock`` of every stage of a cascade (stage 0 first): statistics scopes
    ``stage<k>``, and with ``route_once`` the later stages' routers reuse stage 0's routing
    (``HierarchicalRouter.reuse_routing``), which needs the same experts and groups in every
    stage. Returns the checked ``route_once`` (``ROUTE_ONCE_MODES``); errors name ``key``."""
    mode = check_route_once(route_once, key)
    first = blocks[0].config
    for stage, block in enumerate(blocks):
        block.stats_scope = f"stage{stage}"
        block.router.config_keys["route_once"] = key
        config = block.config
        if mode and (config.groups, config.num_experts) != (first.groups, first.num_experts):
            raise MoEConfigError(
                key, route_once,
                f"stage {stage} has {config.num_experts} experts in {config.groups} groups, stage 0 "
                f"{first.num_experts} in {first.groups}: reusing stage 0's routing needs the same",
            )
        if stage > 0 and mode:
            block.router.reuse_routing(mode)
    return mode


@dataclass
class RoutingPass:
    """The routing of one forward pass of HI-MoE ROI heads through their box stages (one stage
    for standard ROI heads). Created in the heads' forward and handed down explicitly.

    Attributes:
        scene_features: (B, C) pooled image features, for the stages that route their scene.
        scene_targets: optional super-class targets ``(targets (B, G), has_target (B,))``.
        route_once: ``ROUTE_ONCE_MODES``: what the later stages reuse of stage 0's routing.
        routings: the ``Routing`` of every stage run so far, stage 0 first.
        rows: (M,) long, the rows of the previous stage's RoIs that the next stage's M RoIs come
            from (training drops or resamples them); None: the same RoIs, in the same order.
            Needed only with ``route_once='instance'``; used by the next ``run_stage``.
    """

    scene_features: Optional[torch.Tensor]
    scene_targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    route_once: str = ""
    routings: List[Routing] = field(default_factory=list)
    rows: Optional[torch.Tensor] = None

    def run_stage(self, stage: int, box_head: Any, roi_features: torch.Tensor,
                  image_index: torch.Tensor) -> tuple:
        """Run stage ``stage``'s HI-MoE box head on its RoIs, routing them or reusing stage 0's
        routing, and record its ``Routing``.

        ``box_head(roi_features, scene_features, image_index, scene_targets, scene=, routing=)``
        is either framework's box head; it returns a tuple whose last item is the ``Routing``.
        Returns the box head's outputs.
        """
        if stage != len(self.routings):
            raise RuntimeError(f"stage {stage} runs after {len(self.routings)} stages of this pass")
        if stage == 0 or not self.route_once:
            outputs = box_head(roi_features, self.scene_features, image_index, self.scene_targets)
        elif self.route_once == "scene":
            outputs = box_head(roi_features, None, image_index, None, scene=self.routings[0].scene)
        else:
            previous = self.routings[-1]
            routing = previous if self.rows is None else previous.select(self.rows)
            outputs = box_head(roi_features, None, image_index, None, routing=routing)
        self.routings.append(outputs[-1])
        self.rows = None
        return outputs
