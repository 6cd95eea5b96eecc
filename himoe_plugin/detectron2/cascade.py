"""``InstanceMoECascadeROIHeads``: Cascade R-CNN ROI heads whose every stage has an HI-MoE box head."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads
from detectron2.modeling.roi_heads.cascade_rcnn import _ScaleGradient
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from ..core import MoEConfigError, RoutingPass, link_cascade_stages, weighted_losses
from .config import himoe_key
from .scene_routing import SceneRoutedROIHeads, check_moe_box_head


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
    whole routing have neither (they belong to stage 0). Inference output is the stock one;
    with ``output_routing`` (``MODEL.HIMOE.OUTPUT_ROUTING``) it also holds ``pred_experts`` (n, k)
    long and ``pred_expert_weights`` (n, k) float: the routing of the last stage (with
    ``route_once='instance'``, stage 0's) for the RoI each prediction came from.
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
        output_routing: bool = False,
        **kwargs,
    ):
        """
        Args:
            scene_in_features, scene_strides, class_to_group, stats_period: see
                ``SceneRoutedROIHeads._init_scene_routing``.
            route_once: ``""``, ``"scene"`` or ``"instance"`` (see the class).
            output_routing: add ``pred_experts`` / ``pred_expert_weights`` to the predictions.
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
        self.output_routing = output_routing

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            raise MoEConfigError(
                "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False,
                "cascade ROI heads regress class-agnostic boxes (the stock cascade configs set it True)",
            )
        ret = super().from_config(cfg, input_shape)
        for box_head in ret["box_heads"]:
            check_moe_box_head(box_head, "InstanceMoECascadeROIHeads")
        ret.update(cls.scene_routing_from_cfg(cfg, input_shape, ret["box_heads"][0]))
        ret["route_once"] = cfg.MODEL.HIMOE.ROUTE_ONCE
        ret["output_routing"] = cfg.MODEL.HIMOE.OUTPUT_ROUTING
        return ret

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances],
                     targets: Optional[List[Instances]] = None):
        """As ``CascadeROIHeads._forward_box``: the stages in turn, each refining the previous
        one's boxes, with this pass's routing (``RoutingPass``) handed from stage to stage. Adds
        the stages' routing losses in training, the routing to the predictions at inference
        with ``output_routing``."""
        routing_pass = RoutingPass(
            self.pool_scene_features(features, proposals), self.scene_targets(targets), self.route_once
        )
        box_features = [features[f] for f in self.box_in_features]
        image_sizes = [p.image_size for p in proposals]
        stages = []  # (predictions, proposals) of every stage
        for stage in range(self.num_cascade_stages):
            if stage > 0:
                boxes = self.box_predictor[stage - 1].predict_boxes(*stages[-1])
                if self.training and self.route_once == "instance":
                    routing_pass.rows = nonempty_rows(boxes, image_sizes)
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
                if self.training:
                    proposals = self._match_and_label_boxes(proposals, stage, targets)
            stages.append((self._run_stage(box_features, proposals, stage, routing_pass), proposals))
        if self.training:
            return self._stage_losses(stages, routing_pass)
        return self._predict(stages, image_sizes, routing_pass)

    def _stage_losses(self, stages, routing_pass: RoutingPass) -> Dict[str, torch.Tensor]:
        """Every stage's box losses and routing losses, suffixed ``_stage<k>``."""
        losses = {}
        storage = get_event_storage()
        for stage, (predictions, proposals) in enumerate(stages):
            with storage.name_scope(f"stage{stage}"):
                stage_losses = self.box_predictor[stage].losses(predictions, proposals)
            losses.update({f"{name}_stage{stage}": value for name, value in stage_losses.items()})
        for stage, routing in enumerate(routing_pass.routings):
            routing_losses = weighted_losses(routing.losses, self.box_head[stage].moe_config)
            losses.update({f"{name}_stage{stage}": value for name, value in routing_losses.items()})
        self._log_routing()
        return losses

    def _predict(self, stages, image_sizes, routing_pass: RoutingPass) -> List[Instances]:
        """The last stage's boxes scored by the mean of every stage's class scores."""
        per_stage = [self.box_predictor[k].predict_probs(*stages[k]) for k in range(len(stages))]
        scores = [sum(image_scores) * (1.0 / self.num_cascade_stages) for image_scores in zip(*per_stage)]
        predictions, proposals = stages[-1]
        predictor = self.box_predictor[-1]
        pred_instances, prediction_rows = fast_rcnn_inference(
            predictor.predict_boxes(predictions, proposals), scores, image_sizes,
            predictor.test_score_thresh, predictor.test_nms_thresh, predictor.test_topk_per_image,
        )
        if self.output_routing:
            self.add_routing_to_predictions(pred_instances, routing_pass.routings[-1], proposals, prediction_rows)
        return pred_instances

    def _run_stage(self, features: List[torch.Tensor], proposals: List[Instances], stage: int,
                   routing_pass: RoutingPass):
        """As ``CascadeROIHeads._run_stage``, with the stage's box head routing its RoIs (or
        reusing stage 0's routing) through ``routing_pass``."""
        box_features = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        # As the stock heads: the stages' losses add up, their gradients on the features average.
        box_features = _ScaleGradient.apply(box_features, 1.0 / self.num_cascade_stages)
        image_index = self.roi_image_index(proposals)
        box_features, _ = routing_pass.run_stage(stage, self.box_head[stage], box_features, image_index)
        return self.box_predictor[stage](box_features)


def nonempty_rows(boxes: List[torch.Tensor], image_sizes: List[Tuple[int, int]]) -> torch.Tensor:
    """The rows (over all images, image by image) of the boxes that stay non-empty once clipped to
    their image: those ``CascadeROIHeads._create_proposals_from_boxes`` keeps in training."""
    rows, offset = [], 0
    for boxes_per_image, image_size in zip(boxes, image_sizes):
        clipped = Boxes(boxes_per_image.detach().clone())
        clipped.clip(image_size)
        rows.append(clipped.nonempty().nonzero().squeeze(1) + offset)
        offset += len(boxes_per_image)
    return torch.cat(rows)
