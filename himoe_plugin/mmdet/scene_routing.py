"""What every HI-MoE RoI head (standard and cascade) does around its MoE bbox heads: pool each
image's neck features for the scene router, derive its super-class targets, check its settings."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from mmdet.structures import SampleList
from mmengine.structures import InstanceData
from torch import Tensor

from ..core import (MoEConfigError, Routing, RoutingPass, check_class_groups, check_int,
                    check_scene_strides, masked_mean_pool, routing_of_predictions,
                    scene_targets_from_labels)
from .bbox_head import ROI_INDEX, MoEConvFCBBoxHead


class RoutedFeatures(tuple):
    """The neck features of one batch (a tuple of (B, C, H_l, W_l), as the stock RoI heads take
    them) carrying ``routing_pass``: the routing of this pass through the bbox heads (scene
    features, super-class targets, each stage's routing). Created by the HI-MoE RoI heads'
    ``loss``/``predict``/``forward`` and handed down with the features to ``_bbox_forward``,
    so that no per-batch state is kept on a module."""

    routing_pass: RoutingPass

    def __new__(cls, features: Sequence[Tensor], routing_pass: RoutingPass) -> 'RoutedFeatures':
        routed = super().__new__(cls, features)
        routed.routing_pass = routing_pass
        return routed


class SceneRoutedRoIHead:
    """Mixin of the RoI heads that feed MoE bbox heads (``InstanceMoERoIHead``,
    ``InstanceMoECascadeRoIHead``): call ``_init_scene_routing`` after the stock ``__init__``
    and hand the stock RoI head ``routed_features(x, ...)`` instead of ``x``."""

    #: The per-pass routing object ``routed_features`` creates.
    routing_pass_type = RoutingPass

    def _init_scene_routing(self,
                            bbox_heads: Sequence[torch.nn.Module],
                            neck_strides: Sequence[int],
                            scene_featmap_strides: Optional[Sequence[int]],
                            stats_period: int) -> None:
        """
        Args:
            bbox_heads: the bbox heads (all must be MoE heads; the first one's router settings
                define the scene groups).
            neck_strides: strides of the levels the bbox RoI extractor reads.
            scene_featmap_strides: strides of the neck levels the scene router pools (the
                first ``len(...)`` levels); None uses ``neck_strides``.
            stats_period: write the mean statistics every this many training iterations.
        """
        for head in bbox_heads:
            if not isinstance(head, MoEConvFCBBoxHead):
                raise MoEConfigError(
                    'roi_head.bbox_head.type', type(head).__name__,
                    f'{type(self).__name__} needs MoE bbox heads, e.g. MoEShared2FCBBoxHead')
        strides = check_scene_strides(
            neck_strides if scene_featmap_strides is None else scene_featmap_strides,
            'roi_head.scene_featmap_strides')
        neck_strides = list(neck_strides)
        if list(strides) != neck_strides[:len(strides)]:
            raise MoEConfigError('roi_head.scene_featmap_strides', scene_featmap_strides,
                                 f'the scene router pools the first len(strides) neck levels, whose '
                                 f'strides are {neck_strides[:len(strides)]} (of {neck_strides})')
        self.stats_period = check_int(stats_period, 'roi_head.stats_period', 1)
        self.scene_featmap_strides = strides
        self.scene_groups = bbox_heads[0].moe_config.groups
        if any(head.scene_supervised for head in bbox_heads):
            self.register_buffer(
                'class_to_group',
                torch.full((bbox_heads[0].num_classes,), -1, dtype=torch.long),
                persistent=False)
        else:
            self.class_to_group: Optional[Tensor] = None
        self._class_groups_set = False

    def set_class_groups(self, class_to_group: Sequence[int]) -> None:
        """Set the expert group (supercategory index) of every class, for super-class
        supervision of the scene router (done by ``SceneSupervisionHook``)."""
        if self.class_to_group is None:
            raise RuntimeError('set_class_groups: the bbox head has no loss_scene entry')
        self.class_to_group.copy_(check_class_groups(
            class_to_group, self.class_to_group.numel(), self.scene_groups))
        self._class_groups_set = True

    def routed_features(self,
                        x: Tuple[Tensor],
                        batch_data_samples: Optional[SampleList],
                        with_targets: bool = False,
                        route_once: str = '') -> RoutedFeatures:
        """``x`` with a fresh ``RoutingPass`` for one pass through the bbox heads: each image's
        neck features mean-pooled over its unpadded area (``img_shape``; the whole padded maps
        without data samples) for the scene router, and in training its super-class targets."""
        if batch_data_samples is not None:
            shapes = [tuple(s.metainfo['img_shape'][:2]) for s in batch_data_samples]
        else:
            stride = self.scene_featmap_strides[0]
            shapes = [(x[0].shape[-2] * stride, x[0].shape[-1] * stride)] * x[0].shape[0]
        strides = self.scene_featmap_strides
        scene_features = masked_mean_pool(x[:len(strides)], strides, shapes)
        targets = None
        if with_targets and self.class_to_group is not None:
            targets = self._scene_targets(batch_data_samples)
        return RoutedFeatures(x, self.routing_pass_type(scene_features, targets, route_once))

    def routing_pass(self, x: Tuple[Tensor]) -> RoutingPass:
        """The ``RoutingPass`` that ``x`` carries (see ``routed_features``)."""
        if not isinstance(x, RoutedFeatures):
            raise RuntimeError(f'{type(self).__name__}: the bbox heads run inside loss(), '
                               'predict() or forward(), which give the scene router the image shapes')
        return x.routing_pass

    @staticmethod
    def add_routing_to_results(results_list: List[InstanceData], routing: Optional[Routing],
                               rois_per_image: Sequence[int], top_k: int) -> None:
        """With ``test_cfg.rcnn.output_routing``: replace every result's ``roi_index`` (written by
        the MoE bbox head) by ``experts`` (n, k) long and ``expert_weights`` (n, k) float32, the
        routing of the RoI each detection came from (``routing``: that of the RoIs of all
        images, image after image; None when the batch had no proposal at all; ``top_k``: its
        experts per RoI)."""
        if routing is None:
            for results in results_list:
                device = results.bboxes.device
                results.experts = torch.zeros((0, top_k), dtype=torch.long, device=device)
                results.expert_weights = torch.zeros((0, top_k), dtype=torch.float32, device=device)
            return
        rows = [results.pop(ROI_INDEX) for results in results_list]
        for results, (experts, weights) in zip(
                results_list, routing_of_predictions(routing, rois_per_image, rows)):
            results.experts, results.expert_weights = experts, weights

    def _scene_targets(self, batch_data_samples: SampleList) -> Tuple[Tensor, Tensor]:
        if not self._class_groups_set:
            raise RuntimeError(
                'roi_head.bbox_head.loss_scene is set, but no class -> supercategory groups '
                "were given: add custom_hooks=[dict(type='SceneSupervisionHook')] to the config")
        labels = [sample.gt_instances.labels for sample in batch_data_samples]
        return scene_targets_from_labels(labels, self.class_to_group, self.scene_groups)
