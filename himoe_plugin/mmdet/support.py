"""Which MMDetection detectors HI-MoE supports, and a check that says so before mmdet's own
``TypeError`` about an argument the detector does not take (e.g. RetinaNet given ``roi_head``)."""
from __future__ import annotations

from typing import Any, Mapping

from mmdet.models.detectors import TwoStageDetector
from mmdet.registry import MODELS

from ..core import MoEConfigError

#: What the MMDetection adapter supports, for errors about the rest.
SUPPORTED_DETECTORS = (
    "HI-MoE supports two-stage detectors with RoI heads (Faster/Mask R-CNN: roi_head.type="
    "'InstanceMoERoIHead'; Cascade (Mask) R-CNN: 'InstanceMoECascadeRoIHead') and the DETR family "
    "(type='HIMoEDETR', 'HIMoEDeformableDETR', 'HIMoEDINO')")

#: The HI-MoE DETR-family detectors (``detr.py``), by registered name.
MOE_DETR_DETECTORS = ('HIMoEDETR', 'HIMoEDeformableDETR', 'HIMoEDINO')


def _registered(type_name: Any):
    if not isinstance(type_name, str):
        return type_name
    return MODELS.get(type_name)


def _himoe_parts(model_cfg: Mapping) -> list:
    """The config keys of ``model_cfg`` that set HI-MoE components."""
    from .bbox_head import MoEConvFCBBoxHead
    from .scene_routing import SceneRoutedRoIHead

    parts = []
    roi_head = model_cfg.get('roi_head') or {}
    roi_cls = _registered(roi_head.get('type')) if roi_head else None
    if isinstance(roi_cls, type) and issubclass(roi_cls, SceneRoutedRoIHead):
        parts.append('roi_head')
    heads = model_cfg.get('bbox_head')
    for head in heads if isinstance(heads, (list, tuple)) else [heads]:
        head_cls = _registered(head.get('type')) if isinstance(head, Mapping) else None
        if isinstance(head_cls, type) and issubclass(head_cls, MoEConvFCBBoxHead):
            parts.append('bbox_head')
    if model_cfg.get('moe') is not None:
        parts.append('moe')
    return parts


def check_supported_detector(model_cfg: Mapping) -> None:
    """Fail with an error saying what is supported when ``model_cfg`` (a ``model=dict(...)``
    config) sets HI-MoE components on a detector that cannot run them (RetinaNet, FCOS, ...)."""
    parts = _himoe_parts(model_cfg)
    if not parts:
        return
    type_name = model_cfg.get('type')
    detector = _registered(type_name)
    name = getattr(detector, '__name__', str(type_name))
    if name in MOE_DETR_DETECTORS or (isinstance(detector, type) and issubclass(detector, TwoStageDetector)
                                      and 'moe' not in parts):
        return
    raise MoEConfigError(
        'model.type', type_name,
        f"the config sets HI-MoE components ({', '.join(f'model.{p}' for p in parts)}) that this "
        f"detector cannot run. {SUPPORTED_DETECTORS}")
