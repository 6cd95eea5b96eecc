"""``InstanceMoEROIHead``: StandardROIHeads whose box head routes every RoI through HI-MoE."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances

from ..core import weighted_losses
from .scene_routing import SceneRoutedROIHeads, check_moe_box_head, supercategory_groups

__all__ = ["InstanceMoEROIHead", "supercategory_groups"]


@ROI_HEADS_REGISTRY.register()
class InstanceMoEROIHead(SceneRoutedROIHeads, StandardROIHeads):
    """Faster/Mask R-CNN ROI heads with a hierarchical instance-conditioned MoE box head.

    The scene router sees each image's masked mean-pooled ``scene_in_features``; the instance
    router sees each real proposal's pooled feature (padding never enters routing). Training
    adds the routing losses (``loss_moe_*``) to the usual losses and writes routing statistics
    (``himoe/*``) to the EventStorage every ``stats_period`` iterations. Inference output is
    exactly the stock ``Instances``; with ``output_routing`` they also hold ``pred_experts``
    (n, k) long and ``pred_expert_weights`` (n, k) float: the experts and combine weights of the
    proposal each prediction came from.
    """

    @configurable
    def __init__(
        self,
        *,
        scene_in_features: Sequence[str],
        scene_strides: Sequence[int],
        class_to_group: Optional[Sequence[int]] = None,
        stats_period: int = 20,
        output_routing: bool = False,
        **kwargs,
    ):
        """
        Args:
            scene_in_features, scene_strides, class_to_group, stats_period: see
                ``SceneRoutedROIHeads._init_scene_routing``.
            output_routing: add ``pred_experts`` / ``pred_expert_weights`` to the predictions.
            kwargs: everything ``StandardROIHeads`` takes; ``box_head`` must be a
                ``MoEConvFCBoxHead``.
        """
        super().__init__(**kwargs)
        check_moe_box_head(self.box_head, "InstanceMoEROIHead")
        self._init_scene_routing([self.box_head], scene_in_features, scene_strides, class_to_group, stats_period)
        self.output_routing = output_routing

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        check_moe_box_head(ret["box_head"], "InstanceMoEROIHead")
        ret.update(cls.scene_routing_from_cfg(cfg, input_shape, ret["box_head"]))
        ret["output_routing"] = cfg.MODEL.HIMOE.OUTPUT_ROUTING
        return ret

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        """As ``StandardROIHeads.forward``; the ground truth also supervises the scene router."""
        if not self.training:
            return super().forward(images, features, proposals, targets)
        assert targets, "'targets' argument is required during training"
        scene_targets = self.scene_targets(targets)
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals, scene_targets)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances], scene_targets=None):
        scene_features = self.pool_scene_features(features, proposals)
        box_features = self.box_pooler(
            [features[f] for f in self.box_in_features], [p.proposal_boxes for p in proposals]
        )
        image_index = self.roi_image_index(proposals)
        box_features, routing = self.box_head(box_features, scene_features, image_index, scene_targets)
        predictions = self.box_predictor(box_features)
        del box_features
        if not self.training:
            pred_instances, prediction_rows = self.box_predictor.inference(predictions, proposals)
            if self.output_routing:
                self.add_routing_to_predictions(pred_instances, routing, proposals, prediction_rows)
            return pred_instances

        losses = self.box_predictor.losses(predictions, proposals)
        losses.update(weighted_losses(routing.losses, self.box_head.moe_config))
        self._log_routing()
        if self.train_on_pred_boxes:
            with torch.no_grad():
                pred_boxes = self.box_predictor.predict_boxes_for_gt_classes(predictions, proposals)
                for proposals_per_image, pred_boxes_per_image in zip(proposals, pred_boxes):
                    proposals_per_image.proposal_boxes = Boxes(pred_boxes_per_image)
        return losses
