"""MMDetection config entries -> a core ``MoEBlock``: the router entry, the routing-loss entries
and the owner's own settings, with errors that name the config key the user wrote."""
from __future__ import annotations

from dataclasses import fields
from typing import Dict, Mapping, Optional, Sequence

from mmdet.registry import MODELS
from mmdet.utils import ConfigType, OptConfigType
from mmengine.logging import MessageHub
from torch import Tensor, nn

from ..core import (LOSS_WEIGHT_FIELDS, MoEBlock, MoEConfig, MoEConfigError, Routing,
                    check_number, collect_routing_statistics)
from .losses import LoadBalancingLoss, RouterZLoss, RoutingLoss, SceneSupervisionLoss
from .router import HierarchicalRouter

#: Owner argument -> the routing-loss entry type it must hold.
LOSS_ENTRIES: Dict[str, type] = {
    'loss_balance': LoadBalancingLoss,
    'loss_router_z': RouterZLoss,
    'loss_scene': SceneSupervisionLoss,
}

#: ``MoEConfig`` fields the owner (bbox head, DETR ``moe`` entry) sets itself, not ``router=``.
OWNER_FIELDS = ('shared_expert', 'shared_expert_weight')


def _loss_weight_keys(owner_key: str) -> Dict[str, str]:
    """``MoEConfig`` weight field -> the loss-entry key that sets that weight in MMDetection."""
    keys = {}
    for entry, loss_type in LOSS_ENTRIES.items():
        for term, arg in loss_type.term_weights.items():
            keys[LOSS_WEIGHT_FIELDS[term]] = f'{owner_key}.{entry}.{arg}'
    return keys


def config_keys(owner_key: str) -> Dict[str, str]:
    """Every setting the core may name in errors -> the config key that sets it under
    ``owner_key``, e.g. ``roi_head.bbox_head.router.top_k``, ``roi_head.bbox_head.shared_expert``,
    ``roi_head.bbox_head.expert_channels``."""
    keys = {f.name: f'{owner_key}.router.{f.name}' for f in fields(MoEConfig)}
    keys.update({name: f'{owner_key}.{name}' for name in OWNER_FIELDS})
    keys.update(_loss_weight_keys(owner_key))
    keys.update(expert_dim=f'{owner_key}.expert_channels', route_once='roi_head.route_once')
    return keys


def build_routing_losses(owner_key: str, loss_cfgs: Mapping[str, OptConfigType]
                         ) -> Dict[str, Optional[RoutingLoss]]:
    """Build the routing-loss entries (None: disabled) and check their weights (finite, >= 0);
    errors name ``<owner_key>.<entry>``."""
    losses: Dict[str, Optional[RoutingLoss]] = {}
    for name, loss_type in LOSS_ENTRIES.items():
        cfg = loss_cfgs.get(name)
        if cfg is None:
            losses[name] = None
            continue
        loss = MODELS.build(cfg)
        if not isinstance(loss, loss_type):
            raise MoEConfigError(f'{owner_key}.{name}.type', cfg.get('type'),
                                 f'must be a {loss_type.__name__} (or None to disable it)')
        for arg, weight in loss.weights().items():
            check_number(weight, f'{owner_key}.{name}.{arg}', 0.0)
        losses[name] = loss
    return losses


def build_router(owner_key: str, router_cfg: ConfigType,
                 losses: Mapping[str, Optional[RoutingLoss]], owner_settings: Mapping[str, object],
                 scene_dim: int, instance_dim: int) -> HierarchicalRouter:
    """The ``HierarchicalRouter`` of ``router_cfg`` (its ``type`` defaults to it), with the owner's
    ``shared_expert*`` settings; errors name the key.

    The routing losses are weighted by the owner's loss entries ``losses``, never by the router:
    a loss weight set in ``router_cfg`` fails naming the entry that sets it, and the router's
    own ``MoEConfig`` weights (Detectron2's) stay 0.
    """
    keys = config_keys(owner_key)
    router_cfg = dict(router_cfg)
    router_cfg.setdefault('type', 'HierarchicalRouter')
    for field in [*owner_settings, *LOSS_WEIGHT_FIELDS.values()]:
        if field in router_cfg:
            raise MoEConfigError(f'{owner_key}.router.{field}', router_cfg[field],
                                 f'set it as {keys[field]} instead')
    known = sorted(f.name for f in fields(MoEConfig) if f.name not in keys or keys[f.name].startswith(
        f'{owner_key}.router.'))
    for field in router_cfg:
        if field != 'type' and field not in known:
            raise MoEConfigError(f'{owner_key}.router.{field}', router_cfg[field],
                                 f'unknown setting; known: {known}')
    unweighted = {field: 0.0 for field in LOSS_WEIGHT_FIELDS.values()}
    router = MODELS.build(router_cfg, default_args=dict(
        scene_dim=scene_dim, instance_dim=instance_dim, config_keys=keys, **owner_settings,
        **unweighted))
    if not isinstance(router, HierarchicalRouter):
        raise MoEConfigError(f'{owner_key}.router.type', router_cfg.get('type'),
                             'must be a HierarchicalRouter')
    return router


def routing_losses(losses: Mapping[str, Optional[RoutingLoss]],
                   routings: Sequence[Routing]) -> Dict[str, Tensor]:
    """The ``loss_moe_*`` terms of training ``routings`` (one per MoE block), each weighted by
    its entry of ``losses`` and averaged over the blocks, so a weight means the same for one
    block or many."""
    totals: Dict[str, Tensor] = {}
    for loss in losses.values():
        if loss is None:
            continue
        for routing in routings:
            for name, value in loss(routing).items():
                totals[name] = totals[name] + value if name in totals else value
    return {name: value / len(routings) for name, value in totals.items()}

#: Message-hub runtime info, True while a ``RoutingStatisticsHook`` writes the statistics.
STATS_BY_HOOK = 'himoe_routing_statistics_by_hook'


def write_routing_statistics(model: nn.Module, message_hub: MessageHub) -> None:
    """Write the mean routing statistics of the MoE blocks in ``model`` since the last write
    (accumulated on device; one host sync per block) to ``message_hub`` as ``train/himoe/...``,
    where the ``LogProcessor`` picks them up."""
    for name, value in collect_routing_statistics(model).items():
        message_hub.update_scalar(f'train/{name}', value)


def log_routing_statistics(model: nn.Module, stats_period: int) -> None:
    """Every ``stats_period`` training iterations, ``write_routing_statistics`` to the current
    message hub; nothing while a ``RoutingStatisticsHook`` writes them at the logger's interval."""
    message_hub = MessageHub.get_current_instance()
    if message_hub.get_info(STATS_BY_HOOK):
        return
    iteration = message_hub.get_info('iter')
    if iteration is None:  # outside a runner: count the blocks' own training steps
        steps = [m.statistics.steps for m in model.modules() if isinstance(m, MoEBlock)]
        step = max(steps, default=0)
    else:
        step = iteration + 1
    if step % stats_period == 0:
        write_routing_statistics(model, message_hub)
