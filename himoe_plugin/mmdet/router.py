"""``HierarchicalRouter`` as an MMDetection ``MODELS`` entry (the core router, config-built)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from mmdet.registry import MODELS

from ..core import HierarchicalRouter as CoreHierarchicalRouter
from ..core import MoEConfig


@MODELS.register_module(name='HierarchicalRouter')
class HierarchicalRouter(CoreHierarchicalRouter):
    """The core ``HierarchicalRouter`` built from config keywords.

    Config entry (inside an MoE bbox head)::

        router=dict(type='HierarchicalRouter', num_experts=8, top_k=2,
                    num_groups=4, scene_top_k=2)

    Every keyword is a field of ``himoe_plugin.core.MoEConfig`` and is validated there; the
    owner (bbox head, DETR ``moe`` entry) supplies ``scene_dim``, ``instance_dim``, the config
    keys and the shared-expert fields; its loss entries weight the routing losses.

    Args:
        scene_dim: channels C_s of the scene features (B, C_s).
        instance_dim: channels C_i of the RoI features the instance router sees (N, C_i).
        config_keys: ``MoEConfig`` field (and ``expert_dim``, ``route_once``) -> the config key the
            user wrote, for errors.
        **settings: ``MoEConfig`` fields.
    """

    def __init__(self, scene_dim: int, instance_dim: int,
                 config_keys: Optional[Mapping[str, str]] = None, **settings: Any) -> None:
        keys = dict(config_keys or {})
        config = MoEConfig.from_mapping(settings, key_of=lambda name: keys.get(name, name))
        super().__init__(config, scene_dim=scene_dim, instance_dim=instance_dim, config_keys=keys)
