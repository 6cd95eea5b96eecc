"""Bbox heads whose shared fc layers (all or a contiguous run of them) are HI-MoE experts."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmdet.models.layers import multiclass_nms
from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead
from mmdet.registry import MODELS
from mmdet.utils import ConfigType, OptConfigType
from mmengine.logging import print_log
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ..core import (FCBlockLayout, MoEConfig, MoEConfigError, Routing, SceneRouting,
                    build_fc_experts, check_noise_std, init_fc_experts, load_fc_block,
                    require_routing_inputs, run_fc_block)
from .moe_settings import build_router, build_routing_losses, routing_losses
from .support import SUPPORTED_DETECTORS

#: How errors name the head's settings (its place in a Faster R-CNN config).
HEAD_KEY = 'roi_head.bbox_head'

#: With ``test_cfg.rcnn.output_routing``: the field of the predictions holding the row (within
#: its image's RoIs) of the RoI each detection came from; the RoI head turns it into routing.
ROI_INDEX = 'roi_index'

#: Arguments only dense (one-stage) heads take: an MoE bbox head built in their place.
DENSE_HEAD_ARGS = ('anchor_generator', 'prior_generator', 'stacked_convs', 'feat_channels')

@MODELS.register_module()
class MoEConvFCBBoxHead(ConvFCBBoxHead):
    """``ConvFCBBoxHead`` whose shared fc layers ``moe_fc_layers`` form routed experts.

    .. code-block:: none

        shared convs -> shared fcs before -> [router -> experts] -> shared fcs after
                     -> cls fcs -> cls / reg fcs -> reg

    Each expert is the whole block of fc layers (e.g. fc0+fc1 of ``Shared2FCBBoxHead``), run
    only on the RoIs routed to it. The instance router sees each RoI's spatially averaged
    feature (C,) when the experts start at the first fc layer, else the block's input; the
    scene router sees the pooled image feature given by ``InstanceMoERoIHead``.

    Parameter names follow the dense head (``shared_fcs.<i>`` for the dense fc layers that
    remain); ``moe_block`` (a core ``MoEBlock``) holds the hierarchical router
    (``moe_block.router``) and the experts (``moe_block.moe``). Loading a dense checkpoint (``shared_fcs.<i>`` for every fc of the block, no expert keys) upcycles
    it: every expert (and the shared expert) starts as the dense layers; the router keeps its
    near-neutral init. ``upcycle_report`` lists the mapped keys. Checkpoints written before
    the block existed (``router.*``, ``moe.*`` keys) load unchanged.

    Args:
        moe_fc_layers: contiguous 0-based indices of the shared fc layers that become
            experts; None means all of them.
        expert_channels: hidden width inside a multi-layer expert (0: ``fc_out_channels``).
        shared_expert: add an always-on dense expert (output mixed with weight
            ``shared_expert_weight``).
        shared_expert_weight: weight of the shared expert, in (0, 1).
        router: config of the ``HierarchicalRouter`` (expert count, top-k, scene groups, ...).
        loss_balance: ``LoadBalancingLoss`` entry; None disables both balance terms.
        loss_router_z: ``RouterZLoss`` entry; None disables it.
        loss_scene: ``SceneSupervisionLoss`` entry (needs ``SceneSupervisionHook``); None
            (default) disables super-class supervision.
        upcycle_noise_std: relative std of the noise added to experts upcycled from a dense
            checkpoint (0: identical experts).
        *args, **kwargs: as ``ConvFCBBoxHead``; ``num_shared_fcs`` must be >= 1.
    """

    def __init__(self,
                 *args,
                 moe_fc_layers: Optional[Sequence[int]] = None,
                 expert_channels: int = 0,
                 shared_expert: bool = False,
                 shared_expert_weight: float = 0.5,
                 router: ConfigType = dict(type='HierarchicalRouter'),
                 loss_balance: OptConfigType = dict(
                     type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01),
                 loss_router_z: OptConfigType = dict(type='RouterZLoss', loss_weight=0.001),
                 loss_scene: OptConfigType = None,
                 upcycle_noise_std: float = 0.0,
                 **kwargs) -> None:
        dense_args = [arg for arg in DENSE_HEAD_ARGS if arg in kwargs]
        if dense_args:
            raise MoEConfigError(
                'bbox_head.type', type(self).__name__,
                f'an MoE bbox head is the bbox head of an RoI head, but it was given the arguments '
                f'of a one-stage dense head ({", ".join(dense_args)}): one-stage detectors '
                f'(RetinaNet, FCOS, ...) are not supported. {SUPPORTED_DETECTORS}')
        super().__init__(*args, **kwargs)
        require_routing_inputs(self, _unfed_error)
        if self.num_shared_fcs < 1:
            raise MoEConfigError(f'{HEAD_KEY}.num_shared_fcs', self.num_shared_fcs,
                                 'an MoE bbox head needs at least one shared fc layer')
        dense_fcs = list(self.shared_fcs)
        layout = FCBlockLayout.checked(
            dense_fcs[0].in_features,
            self.conv_out_channels if self.num_shared_convs > 0 else self.in_channels,
            [fc.out_features for fc in dense_fcs],
            list(range(self.num_shared_fcs)) if moe_fc_layers is None else list(moe_fc_layers),
            expert_channels,
            {'moe_fc_layers': f'{HEAD_KEY}.moe_fc_layers', 'expert_dim': f'{HEAD_KEY}.expert_channels'})
        self.moe_fc_layers = list(layout.moe_fc_layers)
        self.upcycle_noise_std = check_noise_std(upcycle_noise_std,
                                                 f'{HEAD_KEY}.upcycle_noise_std')
        self.upcycle_report: List[str] = []

        losses = build_routing_losses(HEAD_KEY, dict(
            loss_balance=loss_balance, loss_router_z=loss_router_z, loss_scene=loss_scene))
        for name, loss in losses.items():
            setattr(self, name, loss)

        router = build_router(
            HEAD_KEY, router, losses,
            dict(shared_expert=shared_expert, shared_expert_weight=shared_expert_weight),
            scene_dim=self.in_channels, instance_dim=layout.router_input_dim)
        self.moe_block = build_fc_experts(layout, router)
        # The dense fc layers that stay keep their stock names (``shared_fcs.<i>``).
        self.shared_fcs = nn.ModuleDict(
            {str(i): fc for i, fc in enumerate(dense_fcs) if i not in layout.moe_fc_layers})
        self.fcs_before = [self.shared_fcs[str(i)] for i in layout.before]
        self.fcs_after = [self.shared_fcs[str(i)] for i in layout.after]

    @property
    def moe_config(self) -> MoEConfig:
        """The validated settings of router, experts and routing losses."""
        return self.moe_block.config

    @property
    def scene_supervised(self) -> bool:
        """Whether the scene router is trained on super-class targets."""
        return self.loss_scene is not None and self.loss_scene.loss_weight > 0

    def init_weights(self) -> None:
        """Stock init, and every expert initialised like the dense shared fcs (Xavier)."""
        super().init_weights()
        init_fc_experts(self.moe_block, nn.init.xavier_uniform_)

    def forward(self,
                x: Tensor,
                scene_feats: Tensor,
                image_index: Tensor,
                scene_targets: Optional[Tuple[Tensor, Tensor]] = None,
                scene: Optional[SceneRouting] = None,
                routing: Optional[Routing] = None,
                ) -> Tuple[Optional[Tensor], Optional[Tensor], Routing]:
        """Route every RoI and predict.

        Args:
            x: (N, C, H, W) RoI features of all images.
            scene_feats: (B, C) pooled feature of each image (None with ``scene``/``routing``).
            image_index: (N,) long, image of each RoI.
            scene_targets: optional ``(targets (B, G), has_target (B,))`` super-class
                targets of the scene router (training only).
            scene / routing: the scene routing, or the whole routing of these RoIs, to reuse
                (computed by an earlier cascade stage, see ``MoEBlock.forward``).

        Returns:
            cls_score (N, num_classes + 1), bbox_pred (N, 4 * num_classes) (or 4 if class
            agnostic), and the ``Routing`` (losses in training, statistics).
        """
        for conv in self.shared_convs:
            x = conv(x)
        if self.with_avg_pool:
            x = self.avg_pool(x)
        x, routing = run_fc_block(x, self.fcs_before, self.moe_block, self.fcs_after, scene_feats,
                                  image_index, scene_targets, scene=scene, routing=routing)

        x_cls = x
        for fc in self.cls_fcs:
            x_cls = self.relu(fc(x_cls))
        x_reg = x
        for fc in self.reg_fcs:
            x_reg = self.relu(fc(x_reg))
        cls_score = self.fc_cls(x_cls) if self.with_cls else None
        bbox_pred = self.fc_reg(x_reg) if self.with_reg else None
        return cls_score, bbox_pred, routing

    def _predict_by_feat_single(self, roi: Tensor, cls_score: Tensor, bbox_pred: Tensor,
                                img_meta: dict, rescale: bool = False,
                                rcnn_test_cfg: OptConfigType = None) -> InstanceData:
        """The stock post-processing; with ``test_cfg.rcnn.output_routing=True`` the results also
        hold ``roi_index`` (n,) long: the row, among the image's RoIs, of the RoI each detection
        came from (the stock NMS, asked for the indices it kept). The RoI head replaces it by the
        routing of that RoI."""
        if rcnn_test_cfg is None or not rcnn_test_cfg.get('output_routing', False):
            return super()._predict_by_feat_single(roi, cls_score, bbox_pred, img_meta, rescale,
                                                   rcnn_test_cfg)
        if roi.shape[0] == 0:
            results = super()._predict_by_feat_single(roi, cls_score, bbox_pred, img_meta,
                                                      rescale, rcnn_test_cfg)
            setattr(results, ROI_INDEX, roi.new_zeros(0, dtype=torch.long))
            return results
        raw = super()._predict_by_feat_single(roi, cls_score, bbox_pred, img_meta, rescale, None)
        per_roi = 1 if bbox_pred is None or self.reg_class_agnostic else self.num_classes
        det_bboxes, det_labels, kept = multiclass_nms(
            raw.bboxes, raw.scores, rcnn_test_cfg.score_thr, rcnn_test_cfg.nms,
            rcnn_test_cfg.max_per_img, box_dim=raw.bboxes.shape[1] // per_roi, return_inds=True)
        results = InstanceData(bboxes=det_bboxes[:, :-1], scores=det_bboxes[:, -1],
                               labels=det_labels)
        setattr(results, ROI_INDEX, kept // (raw.scores.shape[1] - 1))
        return results

    def routing_losses(self, routing: Routing) -> Dict[str, Tensor]:
        """The weighted auxiliary losses (``loss_moe_*``) of a training ``Routing``."""
        entries = {name: getattr(self, name) for name in ('loss_balance', 'loss_router_z',
                                                           'loss_scene')}
        return routing_losses(entries, [routing])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        dense = [f'{prefix}shared_fcs.{i}' for i in self.moe_fc_layers]
        report = load_fc_block(self.moe_block, state_dict, prefix, 'moe_block', dense,
                               self.upcycle_noise_std)
        if report:
            self.upcycle_report = report
            print_log('HI-MoE: upcycled the dense bbox head into experts:\n  '
                      + '\n  '.join(report), logger='current')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@MODELS.register_module()
class MoEShared2FCBBoxHead(MoEConvFCBBoxHead):
    """``Shared2FCBBoxHead`` (Faster R-CNN's box head) with its two fc layers as experts.

    Args:
        fc_out_channels: width of the fc layers (1024 in the stock configs).
        **kwargs: as ``MoEConvFCBBoxHead``.
    """

    def __init__(self, fc_out_channels: int = 1024, **kwargs) -> None:
        super().__init__(
            num_shared_convs=0,
            num_shared_fcs=2,
            num_cls_convs=0,
            num_cls_fcs=0,
            num_reg_convs=0,
            num_reg_fcs=0,
            fc_out_channels=fc_out_channels,
            **kwargs)


def _unfed_error(head: nn.Module) -> MoEConfigError:
    return MoEConfigError(
        f'{HEAD_KEY}.type', type(head).__name__,
        'an HI-MoE bbox head runs only under an HI-MoE RoI head '
        "(roi_head.type='InstanceMoERoIHead', or 'InstanceMoECascadeRoIHead' for cascades), "
        'which gives it the scene features and the image of every RoI; this model\'s RoI head '
        'calls it with the RoI features only')
