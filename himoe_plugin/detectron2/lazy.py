"""LazyConfig helper: turn a stock ``StandardROIHeads`` or ``CascadeROIHeads`` model config into
an HI-MoE one."""
from __future__ import annotations

from typing import Optional, Sequence

from detectron2.config import LazyCall as L

from ..core import MoEConfig, MoEConfigError, check_contiguous_layers, check_route_once
from .box_head import MoEConvFCBoxHead
from .cascade import InstanceMoECascadeROIHeads
from .config import check_head_settings
from .roi_heads import InstanceMoEROIHead, supercategory_groups


def use_himoe_roi_heads(
    model,
    moe_fc_layers: Optional[Sequence[int]] = None,
    expert_dim: int = 0,
    scene_in_features: Sequence[str] = (),
    stats_period: int = 20,
    upcycle_noise_std: float = 0.0,
    supervision_datasets: Sequence[str] = (),
    route_once: str = "",
    **moe_settings,
):
    """Edit a LazyConfig ``model`` in place so that its ROI heads are HI-MoE: a
    ``StandardROIHeads`` model (e.g. ``model_zoo.get_config("common/models/mask_rcnn_fpn.py").model``)
    gets ``InstanceMoEROIHead``, a ``CascadeROIHeads`` model (``common/models/cascade_rcnn.py``,
    its ``box_heads`` list) ``InstanceMoECascadeROIHeads`` with every stage's box head turned
    into a ``MoEConvFCBoxHead`` (its own experts).

    Each stock box head's ``input_shape``, ``conv_dims``, ``fc_dims`` and ``conv_norm`` are
    kept; ``moe_fc_layers`` (default: all fc layers of that head, e.g. ``[0, 1]`` for the 2fc
    head, ``[0]`` for the 4conv1fc head of the LSJ configs) become the experts;
    ``moe_settings`` are ``MoEConfig`` fields (validated here, errors name the field).
    Scene features default to the box features; their strides come from the box pooler scales.
    With ``scene_supervision_weight`` > 0, ``supervision_datasets`` names the registered
    datasets whose category supercategories define the expert group of every class.
    ``route_once`` (cascades only): ``""``, ``"scene"`` or ``"instance"``, see
    ``InstanceMoECascadeROIHeads``.
    """
    moe_config = MoEConfig.from_mapping(moe_settings)
    check_head_settings(
        dict(expert_dim=expert_dim, upcycle_noise_std=upcycle_noise_std, stats_period=stats_period),
        key_of=str,
    )
    route_once = check_route_once(route_once, "route_once")
    if moe_config.scene_supervision_weight > 0 and not supervision_datasets:
        raise ValueError(
            "scene_supervision_weight > 0 needs supervision_datasets=[...], the training datasets "
            "whose category supercategories define the expert groups"
        )
    roi_heads = model.roi_heads

    def moe_box_head(stock_head):
        fc_dims = list(stock_head.fc_dims)
        layers = list(range(len(fc_dims)) if moe_fc_layers is None else moe_fc_layers)
        check_contiguous_layers(layers, len(fc_dims), "moe_fc_layers")
        return L(MoEConvFCBoxHead)(
            input_shape=stock_head.input_shape,
            conv_dims=list(stock_head.get("conv_dims", [])),
            fc_dims=fc_dims,
            conv_norm=stock_head.get("conv_norm", ""),
            moe_config=dict(moe_settings),
            moe_fc_layers=layers,
            expert_dim=expert_dim,
            upcycle_noise_std=upcycle_noise_std,
        )

    if "box_heads" in roi_heads:  # CascadeROIHeads
        roi_heads._target_ = InstanceMoECascadeROIHeads
        roi_heads.box_heads = [moe_box_head(head) for head in roi_heads.box_heads]
        roi_heads.route_once = route_once
    elif route_once:
        raise MoEConfigError(
            "route_once", route_once,
            "only cascade ROI heads (model.roi_heads.box_heads) route once and reuse it in later stages",
        )
    else:
        roi_heads._target_ = InstanceMoEROIHead
        roi_heads.box_head = moe_box_head(roi_heads.box_head)
    box_features = list(roi_heads.box_in_features)
    scene_in_features = list(scene_in_features) or box_features
    strides_of = {
        name: int(round(1.0 / scale)) for name, scale in zip(box_features, roi_heads.box_pooler.scales)
    }
    missing = [name for name in scene_in_features if name not in strides_of]
    if missing:
        raise ValueError(f"scene_in_features: {missing} are not box features {box_features}")
    roi_heads.scene_in_features = scene_in_features
    roi_heads.scene_strides = [strides_of[name] for name in scene_in_features]
    roi_heads.stats_period = stats_period
    if moe_config.scene_supervision_weight > 0:
        roi_heads.class_to_group = L(supercategory_groups)(
            dataset_names=list(supervision_datasets), num_groups=moe_config.groups
        )
    return model
