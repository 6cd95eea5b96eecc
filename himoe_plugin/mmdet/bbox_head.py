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

from ..core import (MoEBlock, MoEConfig, MoEConfigError, Routing, SceneRouting,
                    check_contiguous_layers, check_noise_std, require_routing_inputs)
from .moe_settings import build_router, build_routing_losses, routing_losses

#: How errors name the head's settings (its place in a Faster R-CNN config).
HEAD_KEY = 'roi_head.bbox_head'


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
        super().__init__(*args, **kwargs)
        require_routing_inputs(self, _unfed_error)
        if self.num_shared_fcs < 1:
            raise MoEConfigError(f'{HEAD_KEY}.num_shared_fcs', self.num_shared_fcs,
                                 'an MoE bbox head needs at least one shared fc layer')
        layers = list(range(self.num_shared_fcs)) if moe_fc_layers is None else list(moe_fc_layers)
        check_contiguous_layers(layers, self.num_shared_fcs, f'{HEAD_KEY}.moe_fc_layers')
        if isinstance(expert_channels, bool) or not isinstance(expert_channels, int) \
                or expert_channels < 0:
            raise MoEConfigError(f'{HEAD_KEY}.expert_channels', expert_channels,
                                 'must be an integer >= 0')
        self.moe_fc_layers = layers
        self.upcycle_noise_std = check_noise_std(upcycle_noise_std,
                                                 f'{HEAD_KEY}.upcycle_noise_std')
        self.upcycle_report: List[str] = []

        losses = build_routing_losses(HEAD_KEY, dict(
            loss_balance=loss_balance, loss_router_z=loss_router_z, loss_scene=loss_scene))
        for name, loss in losses.items():
            setattr(self, name, loss)

        dense_fcs = list(self.shared_fcs)
        first, last = layers[0], layers[-1]
        block_in = dense_fcs[first].in_features
        hidden = [expert_channels or self.fc_out_channels] * (last - first)
        # Experts starting at the first fc layer would route on the flattened C*H*W RoI feature;
        # the (much cheaper) spatial mean of the RoI feature carries the same channels.
        self.route_on_pooled_roi = first == 0
        pooled_channels = self.conv_out_channels if self.num_shared_convs > 0 else self.in_channels
        router = build_router(
            HEAD_KEY, router, losses,
            dict(shared_expert=shared_expert, shared_expert_weight=shared_expert_weight),
            scene_dim=self.in_channels,
            instance_dim=pooled_channels if self.route_on_pooled_roi else block_in)
        self.moe_block = MoEBlock(router, [block_in, *hidden, self.fc_out_channels],
                                  activate_output=True)
        # The dense fc layers that stay keep their stock names (``shared_fcs.<i>``).
        self.shared_fcs = nn.ModuleDict(
            {str(i): fc for i, fc in enumerate(dense_fcs) if i not in layers})
        self.fcs_before = [self.shared_fcs[str(i)] for i in range(first)]
        self.fcs_after = [self.shared_fcs[str(i)] for i in range(last + 1, len(dense_fcs))]
        self._inference_routing: Optional[Tuple[Tensor, Routing]] = None

    @property
    def moe_config(self) -> MoEConfig:
        """The validated settings of router, experts and routing losses."""
        return self.moe_block.config

    @property
    def scene_supervised(self) -> bool:
        """Whether the scene router is trained on super-class targets."""
        return self.moe_config.scene_supervision_weight > 0

    def init_weights(self) -> None:
        """Stock init, and every expert initialised like the dense shared fcs (Xavier)."""
        super().init_weights()
        moe = self.moe_block.moe
        for weight, bias in zip(moe.experts.weights, moe.experts.biases):
            for expert_weight in weight.data:
                nn.init.xavier_uniform_(expert_weight)
            nn.init.zeros_(bias)
        if moe.shared is not None:
            for layer in moe.shared.layers:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

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
        router_input = x.mean(dim=(2, 3)) if self.route_on_pooled_roi else None
        x = x.flatten(1)
        for fc in self.fcs_before:
            x = self.relu(fc(x))
        x, routing = self.moe_block(x, scene_feats, image_index, router_input=router_input,
                                    scene_targets=scene_targets, scene=scene, routing=routing)
        if not self.training:  # read by _predict_by_feat_single (test_cfg.rcnn.output_routing)
            self._inference_routing = (image_index, routing)
        for fc in self.fcs_after:
            x = self.relu(fc(x))

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
        hold ``experts`` (n, k) long and ``expert_weights`` (n, k) float: the routing of the RoI
        each detection came from (the stock NMS, asked for the indices it kept)."""
        if rcnn_test_cfg is None or not rcnn_test_cfg.get('output_routing', False):
            return super()._predict_by_feat_single(roi, cls_score, bbox_pred, img_meta, rescale,
                                                   rcnn_test_cfg)
        top_k = self.moe_config.top_k
        if roi.shape[0] == 0:
            results = super()._predict_by_feat_single(roi, cls_score, bbox_pred, img_meta,
                                                      rescale, rcnn_test_cfg)
            results.experts = roi.new_zeros((0, top_k), dtype=torch.long)
            results.expert_weights = roi.new_zeros((0, top_k))
            return results
        raw = super()._predict_by_feat_single(roi, cls_score, bbox_pred, img_meta, rescale, None)
        per_roi = 1 if bbox_pred is None or self.reg_class_agnostic else self.num_classes
        det_bboxes, det_labels, kept = multiclass_nms(
            raw.bboxes, raw.scores, rcnn_test_cfg.score_thr, rcnn_test_cfg.nms,
            rcnn_test_cfg.max_per_img, box_dim=raw.bboxes.shape[1] // per_roi, return_inds=True)
        image_index, routing = self._inference_routing
        image_rows = (image_index == roi[0, 0].long()).nonzero().squeeze(1)
        rows = image_rows[kept // (raw.scores.shape[1] - 1)]
        results = InstanceData(bboxes=det_bboxes[:, :-1], scores=det_bboxes[:, -1],
                               labels=det_labels)
        results.experts = routing.expert_index[rows]
        results.expert_weights = routing.combine_weight[rows].float()
        return results

    def routing_losses(self, routing: Routing) -> Dict[str, Tensor]:
        """The weighted auxiliary losses (``loss_moe_*``) of a training ``Routing``."""
        entries = {name: getattr(self, name) for name in ('loss_balance', 'loss_router_z',
                                                           'loss_scene')}
        return routing_losses(entries, [routing])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        MoEBlock.adopt_flat_keys(state_dict, prefix, 'moe_block')
        dense = [f'{prefix}shared_fcs.{i}' for i in self.moe_fc_layers]
        report = self.moe_block.upcycle(state_dict, prefix + 'moe_block.', dense,
                                        noise_std=self.upcycle_noise_std)
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
