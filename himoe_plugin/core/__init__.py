"""Framework-agnostic HI-MoE core in plain PyTorch (imports neither detectron2 nor mmdet)."""
from .config import EXPERT_BACKENDS, MoEConfig, MoEConfigError, check_contiguous_layers, check_expert_backend
from .dispatch import DispatchPlan, build_dispatch_plan
from .experts import DenseMLP, MoEMLP, StackedMLPExperts, stack_dense_layers
from .losses import (
    groups_of_supercategories,
    scene_supervision_loss,
    scene_targets_from_labels,
    switch_balance_loss,
)
from .pooling import masked_mean_pool
from .router import (
    LOSS_BALANCE,
    LOSS_SCENE_BALANCE,
    LOSS_SCENE_SUPERVISION,
    LOSS_Z,
    HierarchicalRouter,
    Routing,
)
from .stats import RoutingStatsMeter
from .upcycle import upcycle_state_dict

__all__ = [
    "MoEConfig",
    "MoEConfigError",
    "check_contiguous_layers",
    "check_expert_backend",
    "EXPERT_BACKENDS",
    "DispatchPlan",
    "build_dispatch_plan",
    "DenseMLP",
    "MoEMLP",
    "StackedMLPExperts",
    "stack_dense_layers",
    "groups_of_supercategories",
    "scene_supervision_loss",
    "scene_targets_from_labels",
    "switch_balance_loss",
    "masked_mean_pool",
    "LOSS_BALANCE",
    "LOSS_SCENE_BALANCE",
    "LOSS_SCENE_SUPERVISION",
    "LOSS_Z",
    "HierarchicalRouter",
    "Routing",
    "RoutingStatsMeter",
    "upcycle_state_dict",
]
