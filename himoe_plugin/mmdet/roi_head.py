"""``InstanceMoERoIHead``: a ``StandardRoIHead`` whose bbox head routes every RoI through HI-MoE."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.task_modules.samplers import SamplingResult
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from mmdet.utils import InstanceList
from torch import Tensor

from ..core import MoEConfigError
from .moe_settings import log_routing_statistics
from .scene_routing import SceneRoutedRoIHead

#: Settings only cascade RoI heads take: given to ``InstanceMoERoIHead``, stages would be lost.
CASCADE_SETTINGS = ('num_stages', 'stage_loss_weights')


@MODELS.register_module()
class InstanceMoERoIHead(SceneRoutedRoIHead, StandardRoIHead):
    """Faster/Mask R-CNN RoI head with a hierarchical instance-conditioned MoE bbox head.

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
        cascade = [key for key in CASCADE_SETTINGS if key in kwargs]
        if cascade or isinstance(kwargs.get('bbox_head'), (list, tuple)):
            raise MoEConfigError(
                'roi_head.type', 'InstanceMoERoIHead',
                f'the config is a cascade (roi_head.{cascade[0] if cascade else "bbox_head"} is '
                "set per stage) and this head has one stage, so the others would be dropped: "
                "use 'InstanceMoECascadeRoIHead'")
        super().__init__(**kwargs)
        self._init_scene_routing([self.bbox_head], self.bbox_roi_extractor.featmap_strides,
                                 scene_featmap_strides, stats_period)

    def loss(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
             batch_data_samples: SampleList) -> dict:
        """As ``StandardRoIHead.loss``, plus the routing losses ``loss_moe_*``."""
        routed = self.routed_features(x, batch_data_samples, with_targets=True)
        return super().loss(routed, rpn_results_list, batch_data_samples)

    def predict(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
                batch_data_samples: SampleList, rescale: bool = False) -> InstanceList:
        """As ``StandardRoIHead.predict``; with ``test_cfg.rcnn.output_routing=True`` every result
        also holds ``experts`` (n, k) long and ``expert_weights`` (n, k) float: the routing of
        the RoI each detection came from."""
        routed = self.routed_features(x, batch_data_samples)
        results_list = super().predict(routed, rpn_results_list, batch_data_samples, rescale)
        if self.test_cfg is not None and self.test_cfg.get('output_routing', False):
            routings = routed.routing_pass.routings
            self.add_routing_to_results(results_list, routings[-1] if routings else None,
                                        [len(r) for r in rpn_results_list],
                                        self.bbox_head.moe_config.top_k)
        return results_list

    def forward(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
                batch_data_samples: Optional[SampleList] = None) -> tuple:
        """As ``StandardRoIHead.forward`` (tensor mode, FLOP counting). Without data
        samples the scene router pools the whole (padded) feature maps."""
        return super().forward(self.routed_features(x, batch_data_samples), rpn_results_list,
                               batch_data_samples)

    def _bbox_forward(self, x: Tuple[Tensor], rois: Tensor) -> dict:
        """Box head forward through the hierarchical router.

        Args:
            x: multi-level features, each (B, C, H_l, W_l), as ``RoutedFeatures`` (which carry
                this pass's scene features and super-class targets).
            rois: (N, 5) RoIs ``(image index, x1, y1, x2, y2)``.

        Returns:
            dict with ``cls_score`` (N, num_classes + 1), ``bbox_pred`` (N, 4 * num_classes),
            ``bbox_feats`` (N, C, 7, 7) and ``routing`` (the core ``Routing``).
        """
        routing_pass = self.routing_pass(x)
        bbox_feats = self.bbox_roi_extractor(x[:self.bbox_roi_extractor.num_inputs], rois)
        if self.with_shared_head:
            bbox_feats = self.shared_head(bbox_feats)
        cls_score, bbox_pred, routing = self.bbox_head(
            bbox_feats, routing_pass.scene_features, rois[:, 0].long(), routing_pass.scene_targets)
        routing_pass.routings.append(routing)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=bbox_feats,
                    routing=routing)

    def bbox_loss(self, x: Tuple[Tensor], sampling_results: List[SamplingResult]) -> dict:
        """As ``StandardRoIHead.bbox_loss``; ``loss_bbox`` also holds ``loss_moe_*``."""
        bbox_results = super().bbox_loss(x, sampling_results)
        routing = bbox_results['routing']
        bbox_results['loss_bbox'].update(self.bbox_head.routing_losses(routing))
        log_routing_statistics(self, self.stats_period)
        return bbox_results
