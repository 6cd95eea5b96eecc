"""Framework-agnostic HI-MoE core in plain PyTorch (imports neither detectron2 nor mmdet)."""
from .block import STATS_PREFIX, MoEBlock, collect_routing_statistics, format_routing_summary
from .config import MoEConfig, MoEConfigError, check_contiguous_layers
from .dispatch import DispatchPlan, build_dispatch_plan
from .experts import DenseMLP, MoEMLP, StackedMLPExperts
from .losses import (
    groups_of_supercategories,
    read_coco_supercategories,
    scene_supervision_loss,
    scene_targets_from_labels,
    switch_balance_loss,
)
from .pooling import masked_mean_pool, masked_token_mean
from .predictions import routing_of_kept
from .router import (
    LOSS_BALANCE,
    LOSS_SCENE_BALANCE,
    LOSS_SCENE_SUPERVISION,
    LOSS_Z,
    HierarchicalRouter,
    Routing,
    SceneRouting,
)
from .stats import RoutingStatsMeter
from .upcycle import UPCYCLE_MODES, split_dense_layers, stack_dense_layers, upcycle_state_dict

__all__ = [
    "STATS_PREFIX",
    "MoEBlock",
    "collect_routing_statistics",
    "format_routing_summary",
    "MoEConfig",
    "MoEConfigError",
    "check_contiguous_layers",
    "DispatchPlan",
    "build_dispatch_plan",
    "DenseMLP",
    "MoEMLP",
    "StackedMLPExperts",
    "groups_of_supercategories",
    "read_coco_supercategories",
    "scene_supervision_loss",
    "scene_targets_from_labels",
    "switch_balance_loss",
    "masked_mean_pool",
    "masked_token_mean",
    "routing_of_kept",
    "LOSS_BALANCE",
    "LOSS_SCENE_BALANCE",
    "LOSS_SCENE_SUPERVISION",
    "LOSS_Z",
    "HierarchicalRouter",
    "Routing",
    "SceneRouting",
    "RoutingStatsMeter",
    "UPCYCLE_MODES",
    "split_dense_layers",
    "stack_dense_layers",
    "upcycle_state_dict",
]
