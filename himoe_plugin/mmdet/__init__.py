"""MMDetection 3.x adapter: ``InstanceMoERoIHead``, MoE bbox heads, router, losses, hook.

Importing this package (e.g. through ``custom_imports=dict(imports=['himoe_plugin.mmdet'])``
in a config) registers everything in MMDetection's registries and allow-lists the globals of
MMEngine checkpoints for ``torch.load(weights_only=True)``.
"""
try:
    import mmcv  # noqa: F401
    import mmdet  # noqa: F401
    import mmengine  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without MMDetection
    raise ImportError(
        f"himoe_plugin.mmdet needs the '{err.name}' package, which is not installed. "
        "Install MMDetection 3.x with: pip install 'himoe-plugin[mmdet]' "
        "(mmcv needs its compiled ops, see docs/mmdet.md)."
    ) from err

from .bbox_head import MoEConvFCBBoxHead, MoEShared2FCBBoxHead
from .cascade_roi_head import InstanceMoECascadeRoIHead
from .checkpoint import allow_mmengine_checkpoint_globals
from .detr import HIMoEDETR, HIMoEDINO, HIMoEDeformableDETR, MoEFFN
from .hooks import SceneSupervisionHook, supercategory_groups
from .losses import LoadBalancingLoss, RouterZLoss, RoutingLoss, SceneSupervisionLoss
from .roi_head import InstanceMoERoIHead
from .router import HierarchicalRouter
from .runtime_hooks import RoutingStatisticsHook, WeightsOnlyCheckpointHook
from .support import SUPPORTED_DETECTORS, check_supported_detector

allow_mmengine_checkpoint_globals()

__all__ = [
    'HIMoEDETR',
    'HIMoEDINO',
    'HIMoEDeformableDETR',
    'HierarchicalRouter',
    'InstanceMoECascadeRoIHead',
    'InstanceMoERoIHead',
    'LoadBalancingLoss',
    'MoEConvFCBBoxHead',
    'MoEFFN',
    'MoEShared2FCBBoxHead',
    'RouterZLoss',
    'SUPPORTED_DETECTORS',
    'RoutingStatisticsHook',
    'RoutingLoss',
    'SceneSupervisionHook',
    'SceneSupervisionLoss',
    'WeightsOnlyCheckpointHook',
    'allow_mmengine_checkpoint_globals',
    'check_supported_detector',
    'supercategory_groups',
]
