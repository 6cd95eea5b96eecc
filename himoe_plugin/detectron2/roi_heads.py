"""``InstanceMoEROIHead``: StandardROIHeads whose box head routes every RoI through HI-MoE."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..core import (
    MoEConfigError,
    collect_routing_statistics,
    groups_of_supercategories,
    masked_mean_pool,
    read_coco_supercategories,
    routing_of_kept,
    scene_targets_from_labels,
)
from .box_head import MoEConvFCBoxHead
from .config import check_head_settings, himoe_key, moe_config_from_cfg


@ROI_HEADS_REGISTRY.register()
class InstanceMoEROIHead(StandardROIHeads):
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
            scene_in_features: feature maps the scene router pools (e.g. FPN levels).
            scene_strides: their strides w.r.t. the input image.
            class_to_group: for super-class supervision of the scene router, the expert
                group (supercategory index) of every class; None disables it.
            stats_period: write statistics to the EventStorage every this many iterations.
            output_routing: add ``pred_experts`` / ``pred_expert_weights`` to the predictions.
            kwargs: everything ``StandardROIHeads`` takes; ``box_head`` must be a
                ``MoEConvFCBoxHead``.
        """
        super().__init__(**kwargs)
        _check_box_head(self.box_head)
        check_head_settings({"stats_period": stats_period}, key_of=str)
        if len(scene_in_features) != len(scene_strides) or not scene_in_features:
            raise ValueError(
                f"scene_in_features={list(scene_in_features)} and scene_strides="
                f"{list(scene_strides)} must be non-empty and of equal length"
            )
        self.scene_in_features = list(scene_in_features)
        self.scene_strides = [int(s) for s in scene_strides]
        self.stats_period = stats_period
        self.output_routing = output_routing
        if class_to_group is None and self.box_head.moe_config.scene_supervision_weight > 0:
            raise MoEConfigError(
                himoe_key("scene_supervision_weight"),
                self.box_head.moe_config.scene_supervision_weight,
                "super-class supervision needs class_to_group (the expert group of every class): "
                "yaml configs derive it from DATASETS.TRAIN; with LazyConfig pass "
                "use_himoe_roi_heads(..., supervision_datasets=[...]), or set the weight to 0",
            )
        if class_to_group is not None:
            self.register_buffer(
                "class_to_group", torch.as_tensor(list(class_to_group), dtype=torch.long), persistent=False
            )
        else:
            self.class_to_group = None

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        moe_config = moe_config_from_cfg(cfg)
        _check_box_head(ret["box_head"])
        scene_in = list(cfg.MODEL.HIMOE.SCENE_IN_FEATURES) or list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        box_channels = ret["box_head"].moe_block.router.scene_router.in_features
        for name in scene_in:
            if name not in input_shape:
                raise MoEConfigError(
                    himoe_key("scene_in_features"), scene_in, f"no feature map '{name}'; "
                    f"the backbone gives {sorted(input_shape)}"
                )
            if input_shape[name].channels != box_channels:
                raise MoEConfigError(
                    himoe_key("scene_in_features"), scene_in,
                    f"'{name}' has {input_shape[name].channels} channels, the box features "
                    f"{box_channels}",
                )
        ret["scene_in_features"] = scene_in
        ret["scene_strides"] = [input_shape[name].stride for name in scene_in]
        ret["stats_period"] = cfg.MODEL.HIMOE.STATS_PERIOD
        ret["output_routing"] = cfg.MODEL.HIMOE.OUTPUT_ROUTING
        if moe_config.scene_supervision_weight > 0:
            ret["class_to_group"] = supercategory_groups(cfg.DATASETS.TRAIN, moe_config.groups)
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
        scene_targets = None
        if self.class_to_group is not None:
            scene_targets = scene_targets_from_labels(
                [t.gt_classes for t in targets], self.class_to_group, self.box_head.moe_config.groups
            )
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals, scene_targets)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances], scene_targets=None):
        scene_features = masked_mean_pool(
            [features[f] for f in self.scene_in_features],
            self.scene_strides,
            [p.image_size for p in proposals],
        )
        box_features = self.box_pooler(
            [features[f] for f in self.box_in_features], [p.proposal_boxes for p in proposals]
        )
        image_index = torch.cat(
            [box_features.new_full((len(p),), i, dtype=torch.long) for i, p in enumerate(proposals)]
        )
        box_features, routing = self.box_head(box_features, scene_features, image_index, scene_targets)
        predictions = self.box_predictor(box_features)
        del box_features
        if not self.training:
            pred_instances, kept = self.box_predictor.inference(predictions, proposals)
            if self.output_routing:
                counts = [len(p) for p in proposals]
                for instances, (experts, weights) in zip(pred_instances, routing_of_kept(routing, counts, kept)):
                    instances.pred_experts, instances.pred_expert_weights = experts, weights
            return pred_instances

        losses = self.box_predictor.losses(predictions, proposals)
        losses.update(routing.losses)
        self._log_routing()
        if self.train_on_pred_boxes:
            with torch.no_grad():
                pred_boxes = self.box_predictor.predict_boxes_for_gt_classes(predictions, proposals)
                for proposals_per_image, pred_boxes_per_image in zip(proposals, pred_boxes):
                    proposals_per_image.proposal_boxes = Boxes(pred_boxes_per_image)
        return losses

    def _log_routing(self) -> None:
        """Once per period, write the mean routing statistics (accumulated on device by the
        box head's MoE block) to the EventStorage."""
        storage = get_event_storage()
        if (storage.iter + 1) % self.stats_period == 0:
            storage.put_scalars(**collect_routing_statistics(self), smoothing_hint=False)


def _check_box_head(box_head) -> None:
    if not isinstance(box_head, MoEConvFCBoxHead):
        raise TypeError(
            "InstanceMoEROIHead needs MODEL.ROI_BOX_HEAD.NAME='MoEConvFCBoxHead' (box_head), "
            f"got {type(box_head).__name__}"
        )


def supercategory_groups(dataset_names: Sequence[str], num_groups: int) -> List[int]:
    """Group index (sorted supercategory name) of every contiguous class id of the datasets."""
    key = himoe_key("scene_supervision_weight")
    if not dataset_names:
        raise MoEConfigError(key, "DATASETS.TRAIN is empty", "needs a training dataset with supercategories")
    supercategories = None
    for name in dataset_names:
        found = _thing_supercategories(name)
        if found is None:
            raise MoEConfigError(
                key, name,
                "the dataset has no category supercategories: register it with "
                "himoe_plugin.detectron2.register_coco_dataset (or set metadata "
                "'thing_supercategories'), or set the weight to 0",
            )
        if supercategories is not None and found != supercategories:
            raise MoEConfigError(key, list(dataset_names), "the datasets' supercategories differ")
        supercategories = found
    return groups_of_supercategories(supercategories, num_groups, himoe_key("num_groups"))


def _thing_supercategories(dataset_name: str) -> Optional[List[str]]:
    metadata = MetadataCatalog.get(dataset_name)
    found = getattr(metadata, "thing_supercategories", None)
    if found is not None:
        return list(found)
    json_file = getattr(metadata, "json_file", None)
    if json_file is None:
        return None
    try:
        return read_coco_supercategories(json_file)
    except ValueError:
        return None
