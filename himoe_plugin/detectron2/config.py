"""``MODEL.HIMOE`` config keys, their validation, and yaml inheritance from the model zoo."""
from __future__ import annotations

import math
import os
from dataclasses import fields
from typing import Any, Callable, Mapping

from detectron2.config import CfgNode, get_cfg

from ..core import MoEConfig, MoEConfigError, check_contiguous_layers

MODEL_ZOO_PREFIX = "model_zoo://"


def add_himoe_config(cfg: CfgNode) -> None:
    """Add ``MODEL.HIMOE.*`` with defaults (like PointRend's ``add_pointrend_config``)."""
    _C = cfg
    _C.MODEL.HIMOE = CfgNode()
    defaults = MoEConfig()
    for f in fields(MoEConfig):
        setattr(_C.MODEL.HIMOE, f.name.upper(), getattr(defaults, f.name))
    # Which fc layers of the box head (0-based, contiguous) form the experts.
    _C.MODEL.HIMOE.MOE_FC_LAYERS = [0, 1]
    # Hidden width inside a multi-layer expert; 0 keeps MODEL.ROI_BOX_HEAD.FC_DIM.
    _C.MODEL.HIMOE.EXPERT_DIM = 0
    # Feature maps the scene router pools; empty means MODEL.ROI_HEADS.IN_FEATURES.
    _C.MODEL.HIMOE.SCENE_IN_FEATURES = []
    # Write routing statistics to the EventStorage every this many training iterations.
    _C.MODEL.HIMOE.STATS_PERIOD = 20
    # Relative std of the noise added to experts upcycled from a dense checkpoint.
    _C.MODEL.HIMOE.UPCYCLE_NOISE_STD = 0.0
    # Add each prediction's experts and weights to the inference Instances (pred_experts,
    # pred_expert_weights); off: the stock fields only.
    _C.MODEL.HIMOE.OUTPUT_ROUTING = False


def himoe_key(name: str) -> str:
    return f"MODEL.HIMOE.{name.upper()}"


def moe_config_from_cfg(cfg: CfgNode) -> MoEConfig:
    """The core settings from ``cfg.MODEL.HIMOE``; errors name the yaml key."""
    if "HIMOE" not in cfg.MODEL:
        raise KeyError("cfg.MODEL.HIMOE is missing: call add_himoe_config(cfg) before merging files")
    node = cfg.MODEL.HIMOE
    values = {f.name: node[f.name.upper()] for f in fields(MoEConfig)}
    return MoEConfig.from_mapping(values, key_of=himoe_key)


def check_head_settings(values: Mapping[str, Any], key_of: Callable[[str], str]) -> None:
    """Validate the head settings that are not ``MoEConfig`` fields (any subset of
    ``expert_dim``, ``upcycle_noise_std``, ``stats_period``); errors name ``key_of(name)``."""
    for name, value in values.items():
        if name == "upcycle_noise_std":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise MoEConfigError(key_of(name), value, "must be a finite number >= 0")
            continue
        minimum = {"expert_dim": 0, "stats_period": 1}[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise MoEConfigError(key_of(name), value, f"must be an integer >= {minimum}")


def validate_himoe_cfg(cfg: CfgNode) -> None:
    """Fail early, naming the key, on settings the model would reject at build time."""
    moe_config_from_cfg(cfg)
    node = cfg.MODEL.HIMOE
    num_fc = cfg.MODEL.ROI_BOX_HEAD.NUM_FC
    check_contiguous_layers(list(node.MOE_FC_LAYERS), num_fc, himoe_key("moe_fc_layers"))
    check_head_settings(
        {name: node[name.upper()] for name in ("expert_dim", "upcycle_noise_std", "stats_period")},
        key_of=himoe_key,
    )


class HIMoECfgNode(CfgNode):
    """Detectron2 ``CfgNode`` whose ``_BASE_`` may name a model-zoo config.

    ``_BASE_: "model_zoo://COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"`` resolves through
    ``detectron2.model_zoo.get_config_file``, so configs outside the Detectron2 repository can
    inherit stock configs (and their own relative ``_BASE_`` chains) unchanged.
    """

    @classmethod
    def _open_cfg(cls, filename):
        if isinstance(filename, str) and MODEL_ZOO_PREFIX in filename:
            from detectron2.model_zoo import get_config_file

            relative = os.path.normpath(filename.split(MODEL_ZOO_PREFIX, 1)[1])
            return super()._open_cfg(get_config_file(relative))
        return super()._open_cfg(filename)


def get_himoe_cfg() -> HIMoECfgNode:
    """Detectron2's default config plus ``MODEL.HIMOE``; understands ``model_zoo://`` bases."""
    cfg = get_cfg()
    add_himoe_config(cfg)
    return HIMoECfgNode(cfg)
