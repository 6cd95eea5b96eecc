"""What every HI-MoE ROI head (standard and cascade) does around its MoE box heads: pool each
image's features for the scene router, derive its super-class targets, log routing statistics."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage

from ..core import (
    MoEConfigError,
    Routing,
    check_class_groups,
    check_scene_strides,
    collect_routing_statistics,
    groups_of_supercategories,
    image_index_of,
    masked_mean_pool,
    read_coco_supercategories,
    routing_of_predictions,
    scene_targets_from_labels,
)
from .box_head import MoEConvFCBoxHead
from .config import check_head_settings, himoe_key, moe_config_from_cfg


class SceneRoutedROIHeads:
    """Mixin of the ROI heads that feed HI-MoE box heads (``InstanceMoEROIHead``,
    ``InstanceMoECascadeROIHeads``): call ``_init_scene_routing`` after the stock ``__init__``
    and merge ``scene_routing_from_cfg`` into ``from_config``."""

    #: Gives its box heads the scene features and the image of every RoI (see ``needs_moe_roi_heads``).
    feeds_moe_box_head = True

    def _init_scene_routing(
        self,
        box_heads: Sequence[MoEConvFCBoxHead],
        scene_in_features: Sequence[str],
        scene_strides: Sequence[int],
        class_to_group: Optional[Sequence[int]],
        stats_period: int,
    ) -> None:
        """
        Args:
            box_heads: the HI-MoE box heads these ROI heads feed (the first one's router
                settings define the scene groups).
            scene_in_features: feature maps the scene router pools (e.g. FPN levels).
            scene_strides: their strides w.r.t. the input image.
            class_to_group: for super-class supervision of the scene router, the expert
                group (supercategory index) of every class; None disables it.
            stats_period: write statistics to the EventStorage every this many iterations.
        """
        check_head_settings({"stats_period": stats_period}, key_of=str)
        moe_config = box_heads[0].moe_config
        if len(scene_in_features) != len(scene_strides) or not scene_in_features:
            raise ValueError(
                f"scene_in_features={list(scene_in_features)} and scene_strides="
                f"{list(scene_strides)} must be non-empty and of equal length"
            )
        self.scene_in_features = list(scene_in_features)
        self.scene_strides = check_scene_strides(list(scene_strides), "scene_strides")
        self.stats_period = stats_period
        self.scene_groups = moe_config.groups
        if class_to_group is None and moe_config.scene_supervision_weight > 0:
            raise MoEConfigError(
                himoe_key("scene_supervision_weight"),
                moe_config.scene_supervision_weight,
                "super-class supervision needs class_to_group (the expert group of every class): "
                "yaml configs derive it from DATASETS.TRAIN; with LazyConfig pass "
                "use_himoe_roi_heads(..., supervision_datasets=[...]), or set the weight to 0",
            )
        if class_to_group is not None:
            num_classes = len(class_to_group)
            self.register_buffer(
                "class_to_group", check_class_groups(class_to_group, num_classes, self.scene_groups),
                persistent=False,
            )
        else:
            self.class_to_group = None

    @staticmethod
    def scene_routing_from_cfg(cfg, input_shape: Dict[str, ShapeSpec], box_head: MoEConvFCBoxHead) -> Dict[str, Any]:
        """``scene_in_features``, ``scene_strides``, ``stats_period`` and ``class_to_group`` of
        a yaml config; errors name the ``MODEL.HIMOE`` key."""
        moe_config = moe_config_from_cfg(cfg)
        scene_in = list(cfg.MODEL.HIMOE.SCENE_IN_FEATURES) or list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        box_channels = box_head.moe_block.router.scene_router.in_features
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
        settings = {
            "scene_in_features": scene_in,
            "scene_strides": [input_shape[name].stride for name in scene_in],
            "stats_period": cfg.MODEL.HIMOE.STATS_PERIOD,
        }
        if moe_config.scene_supervision_weight > 0:
            settings["class_to_group"] = supercategory_groups(cfg.DATASETS.TRAIN, moe_config.groups)
        return settings

    def pool_scene_features(self, features: Dict[str, torch.Tensor], proposals: List[Instances]) -> torch.Tensor:
        """(B, C) each image's ``scene_in_features`` mean-pooled over its unpadded area."""
        return masked_mean_pool(
            [features[f] for f in self.scene_in_features],
            self.scene_strides,
            [p.image_size for p in proposals],
        )

    def scene_targets(self, targets: Optional[List[Instances]]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Super-class targets of the scene router from the ground truth (None without
        super-class supervision or outside training)."""
        if self.class_to_group is None or not self.training:
            return None
        return scene_targets_from_labels([t.gt_classes for t in targets], self.class_to_group, self.scene_groups)

    @staticmethod
    def roi_image_index(proposals: List[Instances]) -> torch.Tensor:
        """(N,) long, the image of every pooled RoI (``proposals`` image by image); built from
        tensors, so that a traced model takes any number of proposals per image."""
        return image_index_of([p.proposal_boxes.tensor for p in proposals])

    @staticmethod
    def add_routing_to_predictions(
        pred_instances: List[Instances], routing: Routing, proposals: List[Instances],
        prediction_rows: Sequence[torch.Tensor],
    ) -> None:
        """Set ``pred_experts`` (n, k) long and ``pred_expert_weights`` (n, k) float of every
        prediction: the routing of the proposal (``prediction_rows`` within its image) it came from."""
        counts = [p.proposal_boxes.tensor.shape[0] for p in proposals]  # sizes a trace keeps
        for instances, (experts, weights) in zip(
            pred_instances, routing_of_predictions(routing, counts, prediction_rows)
        ):
            instances.pred_experts, instances.pred_expert_weights = experts, weights

    def _log_routing(self) -> None:
        """Once per period, write the mean routing statistics (accumulated on device by the
        box heads' MoE blocks) to the EventStorage."""
        storage = get_event_storage()
        if (storage.iter + 1) % self.stats_period == 0:
            storage.put_scalars(**collect_routing_statistics(self), smoothing_hint=False)


def check_moe_box_head(box_head, roi_heads_name: str) -> None:
    """TypeError naming both keys unless ``box_head`` is an HI-MoE box head."""
    if not isinstance(box_head, MoEConvFCBoxHead):
        raise TypeError(
            f"{roi_heads_name} needs MODEL.ROI_BOX_HEAD.NAME='MoEConvFCBoxHead' (box_head), "
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
