"""``MODEL.HIMOE`` config keys, their validation, and yaml inheritance from the model zoo."""
from __future__ import annotations

import os
import threading
from dataclasses import fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    Res5ROIHeads,
    StandardROIHeads,
)

from ..core import (
    MoEConfig,
    MoEConfigError,
    check_contiguous_layers,
    check_int,
    check_noise_std,
    check_route_once,
)

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
    # (MoEConfig fields above, e.g. EVAL_CAPACITY_FACTOR: the per-expert capacity at inference;
    # 0, the default, is dropless, so that predictions never depend on the rest of the batch.)
    # Write routing statistics to the EventStorage every this many training iterations.
    _C.MODEL.HIMOE.STATS_PERIOD = 20
    # Cascade ROI heads (InstanceMoECascadeROIHeads) only: "" every stage routes its RoIs itself;
    # "scene": stage 0's scene subsets are reused by the later stages; "instance": stage 0's whole
    # routing is, every RoI keeping its experts through the stage-wise box refinement.
    _C.MODEL.HIMOE.ROUTE_ONCE = ""
    # Relative std of the noise added to experts upcycled from a dense checkpoint.
    _C.MODEL.HIMOE.UPCYCLE_NOISE_STD = 0.0
    # Add each prediction's experts and weights to the inference Instances (pred_experts,
    # pred_expert_weights); off: the stock fields only.
    _C.MODEL.HIMOE.OUTPUT_ROUTING = False


def himoe_key(name: str) -> str:
    return f"MODEL.HIMOE.{name.upper()}"


#: Settings of the box head that are not ``MoEConfig`` fields but shape its tensors.
HEAD_SETTINGS = ("expert_dim", "route_once", "moe_fc_layers")

#: Supported ROI heads, for errors about the unsupported ones.
SUPPORTED_ROI_HEADS = (
    "HI-MoE supports the StandardROIHeads family (MODEL.ROI_HEADS.NAME='InstanceMoEROIHead') and "
    "the CascadeROIHeads family ('InstanceMoECascadeROIHeads'), with MODEL.ROI_BOX_HEAD.NAME="
    "'MoEConvFCBoxHead' (FPN-style box heads whose fc layers become the experts)"
)


def config_keys() -> Dict[str, str]:
    """Every setting the core may name in errors -> its yaml key (``MODEL.HIMOE.<NAME>``)."""
    return {name: himoe_key(name) for name in [f.name for f in fields(MoEConfig)] + list(HEAD_SETTINGS)}


def lazy_config_keys() -> Dict[str, str]:
    """The same for a LazyConfig ``MoEConvFCBoxHead`` (``moe_config`` given as a mapping)."""
    keys = {f.name: f"box_head.moe_config.{f.name}" for f in fields(MoEConfig)}
    keys.update(expert_dim="box_head.expert_dim", moe_fc_layers="box_head.moe_fc_layers",
                route_once="roi_heads.route_once")
    return keys


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
    minimum = {"expert_dim": 0, "stats_period": 1}
    for name, value in values.items():
        if name == "upcycle_noise_std":
            check_noise_std(value, key_of(name))
        else:
            check_int(value, key_of(name), minimum[name])


def validate_himoe_cfg(cfg: CfgNode) -> None:
    """Fail early, naming the key, on settings the model would reject at build time."""
    check_roi_heads_family(cfg)
    moe_config_from_cfg(cfg)
    node = cfg.MODEL.HIMOE
    num_fc = cfg.MODEL.ROI_BOX_HEAD.NUM_FC
    if num_fc == 0:
        raise MoEConfigError(
            "MODEL.ROI_BOX_HEAD.NUM_FC", num_fc,
            "the box head has no fc layer to turn into experts: C4 models (Res5ROIHeads, whose box "
            f"head is the res5 stage) are not supported. {SUPPORTED_ROI_HEADS}",
        )
    check_contiguous_layers(list(node.MOE_FC_LAYERS), num_fc, himoe_key("moe_fc_layers"))
    check_head_settings(
        {name: node[name.upper()] for name in ("expert_dim", "upcycle_noise_std", "stats_period")},
        key_of=himoe_key,
    )
    if check_route_once(node.ROUTE_ONCE, himoe_key("route_once")) and not _is_cascade(cfg.MODEL.ROI_HEADS.NAME):
        raise MoEConfigError(
            himoe_key("route_once"), node.ROUTE_ONCE,
            f"only cascade ROI heads route once and reuse it in later stages; "
            f"MODEL.ROI_HEADS.NAME={cfg.MODEL.ROI_HEADS.NAME!r} has one stage: set it to ''",
        )


def check_roi_heads_family(cfg: CfgNode) -> None:
    """An HI-MoE box head only runs under an HI-MoE ROI head (the only ones that give it the
    scene features and the image of every RoI), and the other way round; errors name both keys.
    """
    heads_name, box_name = cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.ROI_BOX_HEAD.NAME
    heads_cls = ROI_HEADS_REGISTRY.get(heads_name)
    moe_heads = _feeds_moe_box_head(heads_cls)
    moe_box = _needs_moe_roi_heads(ROI_BOX_HEAD_REGISTRY.get(box_name))
    if moe_box and not moe_heads:
        raise MoEConfigError(
            "MODEL.ROI_BOX_HEAD.NAME", box_name,
            f"MODEL.ROI_HEADS.NAME={heads_name!r} cannot feed an HI-MoE box head (it gives no scene "
            f"features or image indices); {_himoe_roi_heads_hint(heads_cls)}",
        )
    if moe_heads and not moe_box:
        raise MoEConfigError(
            "MODEL.ROI_BOX_HEAD.NAME", box_name,
            f"MODEL.ROI_HEADS.NAME={heads_name!r} needs an HI-MoE box head: set "
            "MODEL.ROI_BOX_HEAD.NAME='MoEConvFCBoxHead'",
        )


def _himoe_roi_heads_hint(heads_cls: type) -> str:
    if issubclass(heads_cls, CascadeROIHeads):
        return "set MODEL.ROI_HEADS.NAME='InstanceMoECascadeROIHeads'"
    if issubclass(heads_cls, StandardROIHeads):
        return "set MODEL.ROI_HEADS.NAME='InstanceMoEROIHead'"
    if issubclass(heads_cls, Res5ROIHeads):
        return f"C4 models (Res5ROIHeads) are not supported. {SUPPORTED_ROI_HEADS}"
    return SUPPORTED_ROI_HEADS


def _feeds_moe_box_head(heads_cls: Optional[type]) -> bool:
    """Whether these ROI heads give an HI-MoE box head what it needs (marked by the class)."""
    return getattr(heads_cls, "feeds_moe_box_head", False)


def _needs_moe_roi_heads(box_head_cls: Optional[type]) -> bool:
    """Whether this box head only runs under HI-MoE ROI heads (marked by the class)."""
    return getattr(box_head_cls, "needs_moe_roi_heads", False)


def _registered_roi_heads(name: Optional[str]) -> Optional[type]:
    """The ROI heads class registered as ``name``; None if none is (yet)."""
    return ROI_HEADS_REGISTRY.get(name) if name is not None and name in ROI_HEADS_REGISTRY else None


def _is_cascade(roi_heads_name: Optional[str]) -> bool:
    heads_cls = _registered_roi_heads(roi_heads_name)
    return heads_cls is not None and issubclass(heads_cls, CascadeROIHeads)


def _roi_heads_name(loaded: Dict[str, Any]) -> Optional[str]:
    return ((loaded.get("MODEL") or {}).get("ROI_HEADS") or {}).get("NAME")


def check_cascade_kept(files: Sequence[Tuple[str, Optional[str]]]) -> None:
    """Fail if the last of ``files`` replaces the cascade ROI heads of one before it with
    single-stage HI-MoE ROI heads (which would silently drop the later stages).

    Args:
        files: ``(source, resolved MODEL.ROI_HEADS.NAME or None)`` of every file of one
            ``_BASE_`` chain (bases first, the merged file last), or of a file and the
            command-line overrides applied to it.
    """
    *bases, (outer_file, outer_name) = files
    if _is_cascade(outer_name) or not _feeds_moe_box_head(_registered_roi_heads(outer_name)):
        return
    for base_file, base_name in bases:
        if _is_cascade(base_name):
            raise MoEConfigError(
                "MODEL.ROI_HEADS.NAME", outer_name,
                f"{outer_file} replaces the cascade ROI heads {base_name!r} of {base_file}; "
                f"{outer_name!r} has one box stage, so the other cascade stages would be dropped: "
                "set MODEL.ROI_HEADS.NAME='InstanceMoECascadeROIHeads'",
            )


_LOADING = threading.local()


def _model_zoo_path(filename) -> Optional[str]:
    """The model-zoo path of a ``model_zoo://`` file name (also after a relative ``_BASE_`` was
    joined to it), else None."""
    if isinstance(filename, str) and MODEL_ZOO_PREFIX in filename:
        return os.path.normpath(filename.split(MODEL_ZOO_PREFIX, 1)[1])
    return None


class HIMoECfgNode(CfgNode):
    """Detectron2 ``CfgNode`` whose ``_BASE_`` may name a model-zoo config.

    ``_BASE_: "model_zoo://COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"`` resolves through
    ``detectron2.model_zoo.get_config_file``, so configs outside the Detectron2 repository can
    inherit stock configs (and their own relative ``_BASE_`` chains) unchanged. A file that
    turns inherited cascade ROI heads into single-stage HI-MoE ones fails (``check_cascade_kept``).
    """

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe: bool = False):
        chain: Optional[List[Tuple[str, Optional[str]]]] = getattr(_LOADING, "chain", None)
        outermost = chain is None
        if outermost:
            chain = _LOADING.chain = []
        try:
            loaded = super().load_yaml_with_base(filename, allow_unsafe)  # bases recurse here
        finally:
            if outermost:
                del _LOADING.chain
        relative = _model_zoo_path(filename)
        shown = str(filename) if relative is None else MODEL_ZOO_PREFIX + relative
        chain.append((shown, _roi_heads_name(loaded)))
        if outermost:
            check_cascade_kept(chain)
        return loaded

    @classmethod
    def _open_cfg(cls, filename):
        relative = _model_zoo_path(filename)
        if relative is not None:
            from detectron2.model_zoo import get_config_file

            return super()._open_cfg(get_config_file(relative))
        return super()._open_cfg(filename)


def get_himoe_cfg() -> HIMoECfgNode:
    """Detectron2's default config plus ``MODEL.HIMOE``; understands ``model_zoo://`` bases."""
    cfg = get_cfg()
    add_himoe_config(cfg)
    return HIMoECfgNode(cfg)


def load_tool_cfg(config_file: str, opts: Sequence[str]) -> HIMoECfgNode:
    """The config a command-line tool runs (``tools/train_net.py``, ``tools/analyze_model.py``):
    the file, then the ``KEY VALUE`` overrides, on CPU when there is no CUDA, checked the way the
    model build would check it (ROI-head family, ``MODEL.HIMOE`` values) before anything runs."""
    cfg = get_himoe_cfg()
    cfg.merge_from_file(config_file)
    from_file = cfg.MODEL.ROI_HEADS.NAME
    cfg.merge_from_list(list(opts))
    check_cascade_kept([(config_file, from_file), ("the command line", cfg.MODEL.ROI_HEADS.NAME)])
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    heads_cls = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    box_cls = ROI_BOX_HEAD_REGISTRY.get(cfg.MODEL.ROI_BOX_HEAD.NAME)
    if _feeds_moe_box_head(heads_cls) or _needs_moe_roi_heads(box_cls):
        validate_himoe_cfg(cfg)
    return cfg
