"""Framework-agnostic HI-MoE core in plain PyTorch (imports neither detectron2 nor mmdet)."""
from .accounting import (
    LOSS_BALANCE,
    LOSS_SCENE_BALANCE,
    LOSS_SCENE_SUPERVISION,
    LOSS_WEIGHT_FIELDS,
    LOSS_Z,
    account_routing,
    weighted_losses,
)
from .block import MoEBlock
from .cascade import ROUTE_ONCE_MODES, RoutingPass, check_route_once, link_cascade_stages
from .config import (
    EXPERT_BACKENDS,
    MoEConfig,
    MoEConfigError,
    check_contiguous_layers,
    check_expert_backend,
    check_int,
    check_noise_std,
    check_number,
)
from .dispatch import DispatchPlan, build_dispatch_plan
from .experts import DenseMLP, MoEMLP, StackedMLPExperts
from .export_dispatch import ExportDispatchPlan, exporting, image_index_of
from .fc_block import FCBlockLayout, build_fc_experts, init_fc_experts, load_fc_block, run_fc_block
from .guards import check_block_checkpoint, require_routing_inputs
from .losses import (
    groups_of_supercategories,
    read_coco_supercategories,
    scene_supervision_loss,
    scene_targets_from_labels,
    switch_balance_loss,
)
from .params import ParameterCount, count_parameters
from .pooling import masked_mean_pool, masked_token_mean
from .predictions import routing_of_predictions
from .router import HierarchicalRouter
from .routing import Routing, SceneRouting
from .scene import check_class_groups, check_scene_strides
from .stats import (
    STATS_PREFIX,
    RoutingStatsMeter,
    collect_routing_statistics,
    format_routing_summary,
)
from .upcycle import UPCYCLE_MODES, split_dense_layers, stack_dense_layers, upcycle_state_dict

__all__ = [
    "LOSS_BALANCE",
    "LOSS_SCENE_BALANCE",
    "LOSS_SCENE_SUPERVISION",
    "LOSS_WEIGHT_FIELDS",
    "LOSS_Z",
    "account_routing",
    "weighted_losses",
    "MoEBlock",
    "ROUTE_ONCE_MODES",
    "RoutingPass",
    "check_route_once",
    "link_cascade_stages",
    "EXPERT_BACKENDS",
    "MoEConfig",
    "MoEConfigError",
    "check_contiguous_layers",
    "check_expert_backend",
    "check_int",
    "check_noise_std",
    "check_number",
    "DispatchPlan",
    "build_dispatch_plan",
    "DenseMLP",
    "MoEMLP",
    "StackedMLPExperts",
    "ExportDispatchPlan",
    "exporting",
    "image_index_of",
    "FCBlockLayout",
    "build_fc_experts",
    "init_fc_experts",
    "load_fc_block",
    "run_fc_block",
    "check_block_checkpoint",
    "groups_of_supercategories",
    "read_coco_supercategories",
    "scene_supervision_loss",
    "scene_targets_from_labels",
    "switch_balance_loss",
    "ParameterCount",
    "count_parameters",
    "masked_mean_pool",
    "masked_token_mean",
    "routing_of_predictions",
    "HierarchicalRouter",
    "Routing",
    "SceneRouting",
    "check_class_groups",
    "check_scene_strides",
    "STATS_PREFIX",
    "RoutingStatsMeter",
    "collect_routing_statistics",
    "format_routing_summary",
    "UPCYCLE_MODES",
    "split_dense_layers",
    "stack_dense_layers",
    "upcycle_state_dict",
]
