"""Bbox heads whose shared fc layers (all or a contiguous run of them) are HI-MoE experts."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead
from mmdet.registry import MODELS
from mmdet.utils import ConfigType, OptConfigType
from mmengine.logging import print_log
from torch import Tensor, nn

from ..core import (MoEConfig, MoEConfigError, MoEMLP, Routing, check_contiguous_layers,
                    upcycle_state_dict)
from .losses import LoadBalancingLoss, RouterZLoss, RoutingLoss, SceneSupervisionLoss
from .router import HierarchicalRouter

#: How errors name the head's settings (its place in a Faster R-CNN config).
HEAD_KEY = 'roi_head.bbox_head'

#: Head argument -> the routing-loss entry it must hold.
LOSS_ENTRIES: Dict[str, type] = {
    'loss_balance': LoadBalancingLoss,
    'loss_router_z': RouterZLoss,
    'loss_scene': SceneSupervisionLoss,
}

#: ``MoEConfig`` fields the head sets itself (not through ``router=``).
HEAD_FIELDS = ('shared_expert', 'shared_expert_weight')


def config_key(field: str) -> str:
    """The config key of a ``MoEConfig`` field, e.g. ``roi_head.bbox_head.router.top_k``."""
    for entry, loss_type in LOSS_ENTRIES.items():
        for arg, core_field in loss_type.core_weights.items():
            if core_field == field:
                return f'{HEAD_KEY}.{entry}.{arg}'
    if field in HEAD_FIELDS:
        return f'{HEAD_KEY}.{field}'
    return f'{HEAD_KEY}.router.{field}'


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
    remain), ``moe`` holds the experts and ``router`` the hierarchical router. Loading a
    dense checkpoint (``shared_fcs.<i>`` for every fc of the block, no expert keys) upcycles
    it: every expert (and the shared expert) starts as the dense layers; the router keeps its
    near-neutral init. ``upcycle_report`` lists the mapped keys.

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
        if self.num_shared_fcs < 1:
            raise MoEConfigError(f'{HEAD_KEY}.num_shared_fcs', self.num_shared_fcs,
                                 'an MoE bbox head needs at least one shared fc layer')
        layers = list(range(self.num_shared_fcs)) if moe_fc_layers is None else list(moe_fc_layers)
        check_contiguous_layers(layers, self.num_shared_fcs, f'{HEAD_KEY}.moe_fc_layers')
        if isinstance(expert_channels, bool) or not isinstance(expert_channels, int) \
                or expert_channels < 0:
            raise MoEConfigError(f'{HEAD_KEY}.expert_channels', expert_channels,
                                 'must be an integer >= 0')
        if not upcycle_noise_std >= 0:
            raise MoEConfigError(f'{HEAD_KEY}.upcycle_noise_std', upcycle_noise_std, 'must be >= 0')
        self.moe_fc_layers = layers
        self.upcycle_noise_std = float(upcycle_noise_std)
        self.upcycle_report: List[str] = []

        loss_cfgs = dict(loss_balance=loss_balance, loss_router_z=loss_router_z,
                         loss_scene=loss_scene)
        core_weights: Dict[str, float] = {}
        for name, loss_type in LOSS_ENTRIES.items():
            loss = _build_routing_loss(loss_cfgs[name], name, loss_type)
            setattr(self, name, loss)
            core_weights.update(loss.moe_config_weights() if loss else loss_type.disabled_weights())

        dense_fcs = list(self.shared_fcs)
        first, last = layers[0], layers[-1]
        block_in = dense_fcs[first].in_features
        hidden = [expert_channels or self.fc_out_channels] * (last - first)
        head_settings = dict(core_weights, shared_expert=shared_expert,
                             shared_expert_weight=shared_expert_weight)
        # Experts starting at the first fc layer would route on the flattened C*H*W RoI feature;
        # the (much cheaper) spatial mean of the RoI feature carries the same channels.
        self.route_on_pooled_roi = first == 0
        pooled_channels = self.conv_out_channels if self.num_shared_convs > 0 else self.in_channels
        self.router: HierarchicalRouter = _build_router(
            router, scene_dim=self.in_channels,
            instance_dim=pooled_channels if self.route_on_pooled_roi else block_in,
            head_settings=head_settings)
        config = self.moe_config
        self.moe = MoEMLP(
            config.num_experts,
            [block_in, *hidden, self.fc_out_channels],
            shared_expert=config.shared_expert,
            shared_expert_weight=config.shared_expert_weight,
            num_experts_key=config_key('num_experts'),
        )
        # The dense fc layers that stay keep their stock names (``shared_fcs.<i>``).
        self.shared_fcs = nn.ModuleDict(
            {str(i): fc for i, fc in enumerate(dense_fcs) if i not in layers})
        self.fcs_before = [self.shared_fcs[str(i)] for i in range(first)]
        self.fcs_after = [self.shared_fcs[str(i)] for i in range(last + 1, len(dense_fcs))]

    @property
    def moe_config(self) -> MoEConfig:
        """The validated settings of router, experts and routing losses."""
        return self.router.config

    @property
    def scene_supervised(self) -> bool:
        """Whether the scene router is trained on super-class targets."""
        return self.moe_config.scene_supervision_weight > 0

    def init_weights(self) -> None:
        """Stock init, and every expert initialised like the dense shared fcs (Xavier)."""
        super().init_weights()
        experts = self.moe.experts
        for weight, bias in zip(experts.weights, experts.biases):
            for expert_weight in weight.data:
                nn.init.xavier_uniform_(expert_weight)
            nn.init.zeros_(bias)
        if self.moe.shared is not None:
            for layer in self.moe.shared.layers:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self,
                x: Tensor,
                scene_feats: Tensor,
                image_index: Tensor,
                scene_targets: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Optional[Tensor], Optional[Tensor], Routing]:
        """Route every RoI and predict.

        Args:
            x: (N, C, H, W) RoI features of all images.
            scene_feats: (B, C) pooled feature of each image.
            image_index: (N,) long, image of each RoI.
            scene_targets: optional ``(targets (B, G), has_target (B,))`` super-class
                targets of the scene router (training only).

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
        routing = self.router(scene_feats, x if router_input is None else router_input,
                              image_index, scene_targets)
        x = self.moe(x, routing.plan)
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

    def routing_losses(self, routing: Routing) -> Dict[str, Tensor]:
        """The weighted auxiliary losses (``loss_moe_*``) of a training ``Routing``."""
        losses: Dict[str, Tensor] = {}
        for name in LOSS_ENTRIES:
            loss = getattr(self, name)
            if loss is not None:
                losses.update(loss(routing))
        return losses

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        dense_names = [f'shared_fcs.{i}' for i in self.moe_fc_layers]
        report = upcycle_state_dict(
            state_dict, prefix, dense_names, 'moe', self.moe, self.upcycle_noise_std)
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


def _build_routing_loss(cfg: OptConfigType, name: str, loss_type: type) -> Optional[RoutingLoss]:
    if cfg is None:
        return None
    loss = MODELS.build(cfg)
    if not isinstance(loss, loss_type):
        raise MoEConfigError(f'{HEAD_KEY}.{name}.type', cfg.get('type'),
                             f'must be a {loss_type.__name__} (or None to disable it)')
    return loss


def _build_router(cfg: ConfigType, scene_dim: int, instance_dim: int,
                  head_settings: Dict[str, object]) -> HierarchicalRouter:
    for field in head_settings:
        if field in cfg:
            raise MoEConfigError(f'{HEAD_KEY}.router.{field}', cfg[field],
                                 f'set it as {config_key(field)} instead')
    router = MODELS.build(cfg, default_args=dict(
        scene_dim=scene_dim, instance_dim=instance_dim, key_of=config_key, **head_settings))
    if not isinstance(router, HierarchicalRouter):
        raise MoEConfigError(f'{HEAD_KEY}.router.type', cfg.get('type'),
                             'must be a HierarchicalRouter')
    return router
