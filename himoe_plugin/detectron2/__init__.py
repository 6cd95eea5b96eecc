"""Detectron2 adapter: ``InstanceMoEROIHead``, ``InstanceMoECascadeROIHeads`` and
``MoEConvFCBoxHead`` on top of the core.

Importing this package registers them in Detectron2's registries, and makes Detectron2's
``DetectionCheckpointer`` load ``.pkl`` weights with a restricted unpickler (``checkpoint.py``).
"""
try:
    import detectron2  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "himoe_plugin.detectron2 needs the 'detectron2' package, which is not installed. "
        "Install Detectron2 first (see docs/INSTALL.md)."
    ) from err

from .box_head import MoEConvFCBoxHead
from .cascade import InstanceMoECascadeROIHeads
from .checkpoint import RefusedPickleError, SafeDetectionCheckpointer, install_safe_pkl_loading
from .config import HIMoECfgNode, add_himoe_config, get_himoe_cfg, moe_config_from_cfg
from .data import register_bundled_datasets, register_coco_dataset
from .roi_heads import InstanceMoEROIHead

install_safe_pkl_loading()

__all__ = [
    "MoEConvFCBoxHead",
    "InstanceMoEROIHead",
    "InstanceMoECascadeROIHeads",
    "HIMoECfgNode",
    "add_himoe_config",
    "get_himoe_cfg",
    "moe_config_from_cfg",
    "register_bundled_datasets",
    "register_coco_dataset",
    "RefusedPickleError",
    "SafeDetectionCheckpointer",
]
