"""``InstanceMoECascadeRoIHead``: a ``CascadeRoIHead`` whose every stage has an MoE bbox head."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmdet.models.roi_heads import CascadeRoIHead
from mmdet.models.task_modules.samplers import SamplingResult
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from mmdet.utils import ConfigType, InstanceList, OptConfigType
from torch import Tensor

from ..core import MoEConfigError, RoutingPass, link_cascade_stages
from .bbox_head import MoEConvFCBBoxHead
from .moe_settings import log_routing_statistics
from .scene_routing import SceneRoutedRoIHead

#: Stock bbox head type -> its MoE counterpart and the arguments that make it the same head.
MOE_COUNTERPARTS: Dict[str, Tuple[str, Dict[str, int]]] = {
    'Shared2FCBBoxHead': ('MoEShared2FCBBoxHead', {}),
    'Shared4Conv1FCBBoxHead': ('MoEConvFCBBoxHead', dict(
        num_shared_convs=4, num_shared_fcs=1, num_cls_convs=0, num_cls_fcs=0, num_reg_convs=0,
        num_reg_fcs=0)),
    'ConvFCBBoxHead': ('MoEConvFCBBoxHead', {}),
}


@dataclass
class SampledRoutingPass(RoutingPass):
    """A ``RoutingPass`` that also holds the previous stage's sampling results (training), from
    which ``route_once='instance'`` finds the RoI every sampled RoI was refined from."""

    sampling_results: Optional[List[SamplingResult]] = None


def moe_stage_heads(bbox_head: Union[ConfigType, Sequence[ConfigType]], num_stages: int,
                    moe_bbox_head: OptConfigType) -> List[ConfigType]:
    """The configs of the stages' bbox heads: ``moe_bbox_head`` (router, loss entries, ...)
    under each stage's own settings (which win); stock ``Shared2FCBBoxHead`` /
    ``Shared4Conv1FCBBoxHead`` / ``ConvFCBBoxHead`` stages become their MoE counterparts."""
    heads = list(bbox_head) if isinstance(bbox_head, (list, tuple)) else [bbox_head] * num_stages
    out = []
    for stage, head in enumerate(heads):
        name = head['type'] if isinstance(head['type'], str) else head['type'].__name__
        registered = MODELS.get(name)
        settings = copy.deepcopy(moe_bbox_head or {})
        settings.update(copy.deepcopy(head))
        if name in MOE_COUNTERPARTS:
            if moe_bbox_head is None:
                raise MoEConfigError(
                    'roi_head.moe_bbox_head', None,
                    f"stage {stage}'s bbox head is a dense {name}: give the HI-MoE settings of "
                    'the stage bbox heads here (router, loss entries, ...), or make '
                    'roi_head.bbox_head MoE bbox heads')
            moe_type, same_head = MOE_COUNTERPARTS[name]
            settings.update(same_head, type=moe_type)
        elif registered is None or not issubclass(registered, MoEConvFCBBoxHead):
            raise MoEConfigError(
                f'roi_head.bbox_head[{stage}].type', name,
                f'has no HI-MoE counterpart: use one of {sorted(MOE_COUNTERPARTS)} or an MoE bbox head')
        out.append(settings)
    return out


@MODELS.register_module()
class InstanceMoECascadeRoIHead(SceneRoutedRoIHead, CascadeRoIHead):
    """Cascade (Mask) R-CNN RoI head whose every stage's bbox head is an MoE bbox head with its
    own experts and router.

    The scene features are pooled once per batch. ``route_once``: None every stage routes its
    RoIs itself; ``'scene'`` the later stages route their RoIs inside stage 0's scene subsets
    (they have no scene router); ``'instance'`` they reuse stage 0's whole routing: every RoI
    keeps the experts (of each stage's own expert set) that stage 0 chose for the proposal it
    was refined from (no router at all in later stages; training then needs the later stages'
    samplers not to add ground-truth boxes as proposals, which have no stage-0 routing).
    Training adds each stage's routing losses as ``s<k>.loss_moe_*`` (with their configured
    weights, not scaled by ``stage_loss_weights``) and logs statistics as
    ``train/himoe/stage<k>/*``; stages that reuse the whole routing have neither. With
    ``test_cfg.rcnn.output_routing=True`` the predictions hold the routing (``experts``,
    ``expert_weights``) of the last stage for the RoI each detection came from.

    Args:
        num_stages, stage_loss_weights: as ``CascadeRoIHead``.
        bbox_head: as ``CascadeRoIHead`` (a config or one per stage).
        moe_bbox_head: HI-MoE arguments of every stage's bbox head (``router``,
            ``loss_balance``, ``loss_router_z``, ``moe_fc_layers``, ...; a stage's own
            settings win); stock ConvFC-family stages become their MoE counterparts. None:
            the stages must already be MoE heads.
        route_once: None, ``'scene'`` or ``'instance'`` (see above).
        scene_featmap_strides: strides of the neck levels the scene router pools (the first
            ``len(...)`` levels); None uses the bbox RoI extractor's levels.
        stats_period: write the mean statistics every this many training iterations.
        **kwargs: as ``CascadeRoIHead``.
    """

    routing_pass_type = SampledRoutingPass

    def __init__(self,
                 num_stages: int,
                 stage_loss_weights: Sequence[float],
                 bbox_head: Union[ConfigType, Sequence[ConfigType]],
                 moe_bbox_head: OptConfigType = None,
                 route_once: Optional[str] = None,
                 scene_featmap_strides: Optional[Sequence[int]] = None,
                 stats_period: int = 50,
                 **kwargs) -> None:
        super().__init__(num_stages=num_stages, stage_loss_weights=stage_loss_weights,
                         bbox_head=moe_stage_heads(bbox_head, num_stages, moe_bbox_head), **kwargs)
        self._init_scene_routing(list(self.bbox_head), self.bbox_roi_extractor[0].featmap_strides,
                                 scene_featmap_strides, stats_period)
        self.route_once = link_cascade_stages(
            [head.moe_block for head in self.bbox_head], route_once, 'roi_head.route_once')
        if self.route_once == 'instance' and self.train_cfg is not None:
            for stage, stage_cfg in enumerate(self.train_cfg[1:], start=1):
                if stage_cfg.sampler.get('add_gt_as_proposals', True):
                    raise MoEConfigError(
                        f'train_cfg.rcnn[{stage}].sampler.add_gt_as_proposals', True,
                        "route_once='instance' gives every RoI of a later stage the experts stage "
                        '0 chose for the proposal it was refined from; a ground-truth box added '
                        "as a proposal has none: set it to False (Detectron2's cascade never "
                        'adds them after stage 0)')

    def loss(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
             batch_data_samples: SampleList) -> dict:
        """As ``CascadeRoIHead.loss``, plus every stage's routing losses ``s<k>.loss_moe_*``."""
        routed = self.routed_features(x, batch_data_samples, with_targets=True,
                                      route_once=self.route_once)
        losses = super().loss(routed, rpn_results_list, batch_data_samples)
        for stage, routing in enumerate(routed.routing_pass.routings):
            for name, value in self.bbox_head[stage].routing_losses(routing).items():
                losses[f's{stage}.{name}'] = value
        log_routing_statistics(self, self.stats_period)
        return losses

    def predict(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
                batch_data_samples: SampleList, rescale: bool = False) -> InstanceList:
        """As ``CascadeRoIHead.predict``, plus the routing with ``output_routing`` (see the class)."""
        routed = self.routed_features(x, batch_data_samples, route_once=self.route_once)
        results_list = super().predict(routed, rpn_results_list, batch_data_samples, rescale)
        if self.test_cfg is not None and self.test_cfg.get('output_routing', False):
            routings = routed.routing_pass.routings
            self.add_routing_to_results(results_list, routings[-1] if routings else None,
                                        [len(r) for r in rpn_results_list],
                                        self.bbox_head[-1].moe_config.top_k)
        return results_list

    def forward(self, x: Tuple[Tensor], rpn_results_list: InstanceList,
                batch_data_samples: SampleList) -> tuple:
        """As ``CascadeRoIHead.forward`` (tensor mode, FLOP counting)."""
        routed = self.routed_features(x, batch_data_samples, route_once=self.route_once)
        return super().forward(routed, rpn_results_list, batch_data_samples)

    def bbox_loss(self, stage: int, x: Tuple[Tensor],
                  sampling_results: List[SamplingResult]) -> dict:
        """As ``CascadeRoIHead.bbox_loss``; with ``route_once='instance'`` it first finds the
        previous stage's RoI every sampled RoI was refined from."""
        routing_pass = self.routing_pass(x)
        if stage > 0 and self.route_once == 'instance':
            routing_pass.rows = refined_from(routing_pass.sampling_results, sampling_results)
        routing_pass.sampling_results = sampling_results
        return super().bbox_loss(stage, x, sampling_results)

    def _bbox_forward(self, stage: int, x: Tuple[Tensor], rois: Tensor) -> dict:
        """Stage ``stage``'s bbox head forward, routing its RoIs (or reusing stage 0's routing).

        Args:
            stage: the cascade stage.
            x: multi-level features, each (B, C, H_l, W_l), as ``RoutedFeatures``.
            rois: (N, 5) RoIs ``(image index, x1, y1, x2, y2)``.

        Returns:
            dict with ``cls_score``, ``bbox_pred``, ``bbox_feats`` and ``routing``.
        """
        routing_pass = self.routing_pass(x)
        extractor = self.bbox_roi_extractor[stage]
        bbox_feats = extractor(x[:extractor.num_inputs], rois)
        cls_score, bbox_pred, routing = routing_pass.run_stage(
            stage, self.bbox_head[stage], bbox_feats, rois[:, 0].long())
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=bbox_feats,
                    routing=routing)


def refined_from(previous: List[SamplingResult], current: List[SamplingResult]) -> Tensor:
    """For every RoI the current stage sampled (image by image, positives then negatives), the
    row of the previous stage's RoI it was refined from.

    The previous stage's RoIs are its sampled RoIs, image by image, positives then negatives;
    ``refine_bboxes`` drops the positives that were ground-truth boxes, and the current stage
    samples among the remaining refined boxes (no ground truth added, see the class).
    """
    rows, offset = [], 0
    for before, now in zip(previous, current):
        num_before = len(before.pos_inds) + len(before.neg_inds)
        was_gt = torch.zeros(num_before, dtype=torch.bool, device=now.pos_inds.device)
        was_gt[:len(before.pos_is_gt)] = before.pos_is_gt.bool()
        refined = (~was_gt).nonzero().squeeze(1)
        rows.append(offset + refined[torch.cat([now.pos_inds, now.neg_inds])])
        offset += num_before
    return torch.cat(rows)
