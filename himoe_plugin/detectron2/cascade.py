"""``InstanceMoECascadeROIHeads``: Cascade R-CNN ROI heads whose every stage has an HI-MoE box head."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.modeling.roi_heads.cascade_rcnn import _ScaleGradient
from detectron2.structures import Boxes, ImageList, Instances

from ..core import MoEConfigError, Routing, image_index_of, link_cascade_stages, stage_reuse
from .config import himoe_key
from .scene_routing import SceneRoutedROIHeads, check_moe_box_head


@dataclass
class CascadeRouting:
    """The routing state of one forward through the stages.

    Attributes:
        scene_features: (B, C) pooled image features.
        scene_targets: optional super-class targets of the scene router (training).
        routings: the ``Routing`` of every stage run so far.
        kept_rows: rows of the last stage's RoIs that the next stage keeps (training drops
            empty boxes); None keeps all.
    """

    scene_features: torch.Tensor
    scene_targets: Optional[Tuple[torch.Tensor, torch.Tensor]]
    routings: List[Routing] = field(default_factory=list)
    kept_rows: Optional[torch.Tensor] = None


@ROI_HEADS_REGISTRY.register()
class InstanceMoECascadeROIHeads(SceneRoutedROIHeads, CascadeROIHeads):
    """Cascade (Mask) R-CNN ROI heads; every stage's box head is a ``MoEConvFCBoxHead`` with
    its own experts and router.

    The scene features are pooled once per batch. ``route_once`` (``MODEL.HIMOE.ROUTE_ONCE``):
    ``""`` every stage routes its RoIs itself; ``"scene"`` the later stages route their RoIs
    inside stage 0's scene subsets (they have no scene router); ``"instance"`` they reuse
    stage 0's whole routing: every RoI keeps the experts (of each stage's own expert set) that
    stage 0 chose for the proposal it was refined from (no router at all in later stages).
    Training adds each stage's routing losses as ``loss_moe_*_stage<k>`` (each with its
    configured weight) and logs statistics as ``himoe/stage<k>/*``; stages that reuse the
    whole routing have neither (they belong to stage 0). Inference output is the stock one.
    """

    @configurable
    def __init__(
        self,
        *,
        scene_in_features: Sequence[str],
        scene_strides: Sequence[int],
        route_once: str = "",
        class_to_group: Optional[Sequence[int]] = None,
        stats_period: int = 20,
        **kwargs,
    ):
        """
        Args:
            scene_in_features, scene_strides, class_to_group, stats_period: see
                ``SceneRoutedROIHeads._init_scene_routing``.
            route_once: ``""``, ``"scene"`` or ``"instance"`` (see the class).
            kwargs: everything ``CascadeROIHeads`` takes; every entry of ``box_heads`` must be
                a ``MoEConvFCBoxHead``.
        """
        super().__init__(**kwargs)
        for box_head in self.box_head:
            check_moe_box_head(box_head, "InstanceMoECascadeROIHeads")
        self.route_once = link_cascade_stages(
            [box_head.moe_block for box_head in self.box_head], route_once, himoe_key("route_once")
        )
        self._init_scene_routing(list(self.box_head), scene_in_features, scene_strides, class_to_group, stats_period)
        self._routing: Optional[CascadeRouting] = None

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            raise MoEConfigError(
                "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False,
                "cascade ROI heads regress class-agnostic boxes (the stock cascade configs set it True)",
            )
        if cfg.MODEL.HIMOE.OUTPUT_ROUTING:
            raise MoEConfigError(
                himoe_key("output_routing"), True,
                "routing in predictions is implemented for InstanceMoEROIHead, not yet for cascades",
            )
        ret = super().from_config(cfg, input_shape)
        for box_head in ret["box_heads"]:
            check_moe_box_head(box_head, "InstanceMoECascadeROIHeads")
        ret.update(cls.scene_routing_from_cfg(cfg, input_shape, ret["box_heads"][0]))
        ret["route_once"] = cfg.MODEL.HIMOE.ROUTE_ONCE
        return ret

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        """As ``CascadeROIHeads.forward``; the ground truth also supervises the scene router."""
        self._routing = CascadeRouting(self.pool_scene_features(features, proposals), self.scene_targets(targets))
        try:
            return super().forward(images, features, proposals, targets)
        finally:
            self._routing = None

    def _forward_box(self, features, proposals, targets=None):
        """As ``CascadeROIHeads._forward_box``, plus the stages' routing losses in training."""
        outputs = super()._forward_box(features, proposals, targets)
        if self.training:
            for stage, routing in enumerate(self._routing.routings):
                outputs.update({f"{name}_stage{stage}": value for name, value in routing.losses.items()})
            self._log_routing()
        return outputs

    def _run_stage(self, features: List[torch.Tensor], proposals: List[Instances], stage: int):
        """As ``CascadeROIHeads._run_stage``, with the stage's box head routing its RoIs (or
        reusing stage 0's routing)."""
        state = self._routing
        box_features = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        # As the stock heads: the stages' losses add up, their gradients on the features average.
        box_features = _ScaleGradient.apply(box_features, 1.0 / self.num_cascade_stages)
        image_index = image_index_of([p.proposal_boxes.tensor for p in proposals])
        reuse = stage_reuse(self.route_once, stage, state.routings, state.kept_rows)
        box_features, routing = self.box_head[stage](
            box_features,
            None if reuse else state.scene_features,
            image_index,
            None if reuse else state.scene_targets,
            **reuse,
        )
        state.routings.append(routing)
        return self.box_predictor[stage](box_features)

    def _create_proposals_from_boxes(self, boxes: List[torch.Tensor], image_sizes: List[Tuple[int, int]]):
        """As ``CascadeROIHeads._create_proposals_from_boxes``; in training it drops empty
        boxes, and with ``route_once='instance'`` the next stage needs to know which it kept."""
        if self.training and self.route_once == "instance":
            kept, offset = [], 0
            for boxes_per_image, image_size in zip(boxes, image_sizes):
                clipped = Boxes(boxes_per_image.detach().clone())
                clipped.clip(image_size)
                kept.append(clipped.nonempty().nonzero().squeeze(1) + offset)
                offset += len(boxes_per_image)
            self._routing.kept_rows = torch.cat(kept)
        return super()._create_proposals_from_boxes(boxes, image_sizes)
