"""Framework-agnostic HI-MoE core in plain PyTorch (imports neither detectron2 nor mmdet)."""
from .analysis import ParameterCount, count_parameters
from .block import (
    STATS_PREFIX,
    MoEBlock,
    collect_routing_statistics,
    format_routing_summary,
    link_cascade_stages,
)
from .config import (
    EXPERT_BACKENDS,
    ROUTE_ONCE_MODES,
    MoEConfig,
    MoEConfigError,
    check_contiguous_layers,
    check_expert_backend,
    check_noise_std,
    check_route_once,
)
from .dispatch import DispatchPlan, build_dispatch_plan
from .experts import DenseMLP, MoEMLP, StackedMLPExperts
from .export_dispatch import ExportDispatchPlan, exporting
from .guards import require_routing_inputs
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
    stage_reuse,
)
from .stats import RoutingStatsMeter
from .upcycle import UPCYCLE_MODES, split_dense_layers, stack_dense_layers, upcycle_state_dict

__all__ = [
    "ParameterCount",
    "count_parameters",
    "STATS_PREFIX",
    "MoEBlock",
    "collect_routing_statistics",
    "link_cascade_stages",
    "format_routing_summary",
    "MoEConfig",
    "MoEConfigError",
    "check_contiguous_layers",
    "ROUTE_ONCE_MODES",
    "check_route_once",
    "check_expert_backend",
    "check_noise_std",
    "EXPERT_BACKENDS",
    "DispatchPlan",
    "build_dispatch_plan",
    "require_routing_inputs",
    "DenseMLP",
    "MoEMLP",
    "StackedMLPExperts",
    "ExportDispatchPlan",
    "exporting",
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
    "stage_reuse",
    "RoutingStatsMeter",
    "UPCYCLE_MODES",
    "split_dense_layers",
    "stack_dense_layers",
    "upcycle_state_dict",
]
