"""``InstanceMoERoIHead``: a ``StandardRoIHead`` whose bbox head routes every RoI through HI-MoE."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.task_modules.samplers import SamplingResult
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from mmdet.utils import InstanceList
from torch import Tensor

from ..core import MoEConfigError, masked_mean_pool, scene_targets_from_labels
from .bbox_head import MoEConvFCBBoxHead
from .moe_settings import log_routing_statistics


@dataclass
class SceneInputs:
    """What the scene router needs besides the feature maps, for one batch.

    Attributes:
        image_shapes: B pairs (h, w), each image's size before batch padding.
        targets: optional ``(targets (B, G), has_target (B,))`` super-class targets.
    """

    image_shapes: List[Tuple[int, int]]
    targets: Optional[Tuple[Tensor, Tensor]] = None


@MODELS.register_module()
class InstanceMoERoIHead(StandardRoIHead):
    """Faster R-CNN RoI head with a hierarchical instance-conditioned MoE bbox head.

    ``_bbox_forward`` (used by training, testing and FLOP counting) pools each image's
    neck features over its valid (unpadded) area, ``batch_img_metas[i]['img_shape']``, for
    the scene router, and gives the bbox head the image index of every RoI. Training adds
    the routing losses (``loss_moe_*``) to the loss dict and writes routing statistics
    (accumulated on device) to the ``MessageHub`` as ``train/himoe/*`` every ``stats_period``
    iterations, where the ``LogProcessor`` picks them up. Predictions are the stock ones.

    Args:
        scene_featmap_strides: strides of the feature levels the scene router pools (the
            first ``len(scene_featmap_strides)`` levels of the neck output); None uses the
            bbox RoI extractor's levels.
        stats_period: write the mean statistics every this many training iterations (align
            it with ``default_hooks.logger.interval``).
        **kwargs: as ``StandardRoIHead``; ``bbox_head`` must be an ``MoEConvFCBBoxHead``.
    """

    def __init__(self,
                 scene_featmap_strides: Optional[Sequence[int]] = None,
                 stats_period: int = 50,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.bbox_head, MoEConvFCBBoxHead):
            raise MoEConfigError(
                'roi_head.bbox_head.type', type(self.bbox_head).__name__,
                'InstanceMoERoIHead needs an MoE bbox head, e.g. MoEShared2FCBBoxHead')
        strides = (self.bbox_roi_extractor.featmap_strides
                   if scene_featmap_strides is None else scene_featmap_strides)
        if not strides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                              for s in strides):
            raise MoEConfigError('roi_head.scene_featmap_strides', scene_featmap_strides,
                                 'must be a non-empty list of positive integer strides')
        neck_strides = list(self.bbox_roi_extractor.featmap_strides)
        if list(strides) != neck_strides[:len(strides)]:
            raise MoEConfigError('roi_head.scene_featmap_strides', scene_featmap_strides,
                                 f'the scene router pools the first len(strides) neck levels, whose '
                                 f'strides are {neck_strides[:len(strides)]} (of {neck_strides})')
        if isinstance(stats_period, bool) or not isinstance(stats_period, int) \
                or stats_period < 1:
            raise MoEConfigError('roi_head.stats_period', stats_period, 'must be an integer >= 1')
        self.scene_featmap_strides = [int(s) for s in strides]
        self.stats_period = stats_period
        self._scene_inputs: Optional[SceneInputs] = None
        if self.bbox_head.scene_supervised:
            self.register_buffer(
                'class_to_group',
                torch.full((self.bbox_head.num_classes,), -1, dtype=torch.long),
                persistent=False)
        else:
            self.class_to_group: Optional[Tensor] = None
        self._class_groups_set = False

    def set_class_groups(self, class_to_group: Sequence[int]) -> None:
        """Set the expert group (supercategory index) of every class, for super-class
        supervision of the scene router (done by ``SceneSupervisionHook``)."""
        if self.class_to_group is None:
            raise RuntimeError('set_class_groups: the bbox head has no loss_scene entry')
        groups = torch.as_tensor(list(class_to_group), dtype=torch.long)
        num_groups = self.bbox_head.moe_config.groups
        if groups.shape != self.class_to_group.shape or groups.min() < 0 \
                or groups.max() >= num_groups:
            raise ValueError(
                f'class_to_group needs one group in [0, {num_groups}) for each of the '
                f'{self.class_to_group.numel()} classes, got {groups.tolist()}')
        self.class_to_group.copy_(groups)
        self._class_groups_set = True

    def loss(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
             batch_data_samples: SampleList) -> dict:
        """As ``StandardRoIHead.loss``, plus the routing losses ``loss_moe_*``."""
        with self._scene(batch_data_samples, with_targets=True):
            return super().loss(x, rpn_results_list, batch_data_samples)

    def predict(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
                batch_data_samples: SampleList, rescale: bool = False) -> InstanceList:
        """As ``StandardRoIHead.predict``."""
        with self._scene(batch_data_samples):
            return super().predict(x, rpn_results_list, batch_data_samples, rescale)

    def forward(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
                batch_data_samples: Optional[SampleList] = None) -> tuple:
        """As ``StandardRoIHead.forward`` (tensor mode, FLOP counting). Without data
        samples the scene router pools the whole (padded) feature maps."""
        with self._scene(batch_data_samples, num_images=len(rpn_results_list),
                         padded_shape=x[0].shape[-2:]):
            return super().forward(x, rpn_results_list, batch_data_samples)

    def _bbox_forward(self, x: Tuple[Tensor], rois: Tensor) -> dict:
        """Box head forward through the hierarchical router.

        Args:
            x: multi-level features, each (B, C, H_l, W_l).
            rois: (N, 5) RoIs ``(image index, x1, y1, x2, y2)``.

        Returns:
            dict with ``cls_score`` (N, num_classes + 1), ``bbox_pred`` (N, 4 * num_classes),
            ``bbox_feats`` (N, C, 7, 7) and ``routing`` (the core ``Routing``).
        """
        scene = self._scene_inputs
        if scene is None:
            raise RuntimeError('InstanceMoERoIHead._bbox_forward runs inside loss(), predict() '
                               'or forward(), which give the scene router the image shapes')
        bbox_feats = self.bbox_roi_extractor(x[:self.bbox_roi_extractor.num_inputs], rois)
        if self.with_shared_head:
            bbox_feats = self.shared_head(bbox_feats)
        strides = self.scene_featmap_strides
        scene_feats = masked_mean_pool(x[:len(strides)], strides, scene.image_shapes)
        image_index = rois[:, 0].long()
        cls_score, bbox_pred, routing = self.bbox_head(
            bbox_feats, scene_feats, image_index, scene.targets)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=bbox_feats,
                    routing=routing)

    def bbox_loss(self, x: Tuple[Tensor], sampling_results: List[SamplingResult]) -> dict:
        """As ``StandardRoIHead.bbox_loss``; ``loss_bbox`` also holds ``loss_moe_*``."""
        bbox_results = super().bbox_loss(x, sampling_results)
        routing = bbox_results['routing']
        bbox_results['loss_bbox'].update(self.bbox_head.routing_losses(routing))
        log_routing_statistics(self, self.stats_period)
        return bbox_results

    @contextmanager
    def _scene(self,
               batch_data_samples: Optional[SampleList],
               with_targets: bool = False,
               num_images: int = 0,
               padded_shape: Optional[Sequence[int]] = None) -> Iterator[None]:
        """Make the batch's image shapes (and super-class targets) visible to
        ``_bbox_forward`` for the duration of one head call."""
        if batch_data_samples is not None:
            shapes = [tuple(s.metainfo['img_shape'][:2]) for s in batch_data_samples]
        else:
            stride = self.scene_featmap_strides[0]
            shapes = [(padded_shape[0] * stride, padded_shape[1] * stride)] * num_images
        targets = None
        if with_targets and self.class_to_group is not None:
            targets = self._scene_targets(batch_data_samples)
        self._scene_inputs = SceneInputs(shapes, targets)
        try:
            yield
        finally:
            self._scene_inputs = None

    def _scene_targets(self, batch_data_samples: SampleList) -> Tuple[Tensor, Tensor]:
        if not self._class_groups_set:
            raise RuntimeError(
                'roi_head.bbox_head.loss_scene is set, but no class -> supercategory groups '
                "were given: add custom_hooks=[dict(type='SceneSupervisionHook')] to the config")
        labels = [sample.gt_instances.labels for sample in batch_data_samples]
        return scene_targets_from_labels(
            labels, self.class_to_group, self.bbox_head.moe_config.groups)

