"""MMDetection config entries -> a core ``MoEBlock``: the router entry, the routing-loss entries
and the owner's own settings, with errors that name the config key the user wrote."""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence

from mmdet.registry import MODELS
from mmdet.utils import ConfigType, OptConfigType
from mmengine.logging import MessageHub
from torch import Tensor, nn

from ..core import MoEBlock, MoEConfigError, Routing, collect_routing_statistics
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


def config_key_of(owner_key: str) -> Callable[[str], str]:
    """``MoEConfig`` field -> the config key that sets it under ``owner_key``, e.g.
    ``roi_head.bbox_head.router.top_k`` or ``roi_head.bbox_head.loss_balance.loss_weight``."""

    def key_of(field: str) -> str:
        for entry, loss_type in LOSS_ENTRIES.items():
            for arg, core_field in loss_type.core_weights.items():
                if core_field == field:
                    return f'{owner_key}.{entry}.{arg}'
        if field in OWNER_FIELDS:
            return f'{owner_key}.{field}'
        return f'{owner_key}.router.{field}'

    return key_of


def build_routing_losses(owner_key: str, loss_cfgs: Mapping[str, OptConfigType]
                         ) -> Dict[str, Optional[RoutingLoss]]:
    """Build the routing-loss entries (None: disabled); errors name ``<owner_key>.<entry>``."""
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
        losses[name] = loss
    return losses


def build_router(owner_key: str, router_cfg: ConfigType,
                 losses: Mapping[str, Optional[RoutingLoss]], owner_settings: Mapping[str, object],
                 scene_dim: int, instance_dim: int) -> HierarchicalRouter:
    """The ``HierarchicalRouter`` of ``router_cfg`` (its ``type`` defaults to it), with the loss
    weights of ``losses`` and the owner's ``shared_expert*`` settings; errors name the key."""
    key_of = config_key_of(owner_key)
    router_cfg = dict(router_cfg)
    router_cfg.setdefault('type', 'HierarchicalRouter')
    settings = dict(owner_settings)
    for name, loss_type in LOSS_ENTRIES.items():
        loss = losses[name]
        settings.update(loss.moe_config_weights() if loss else loss_type.disabled_weights())
    for field in settings:
        if field in router_cfg:
            raise MoEConfigError(f'{owner_key}.router.{field}', router_cfg[field],
                                 f'set it as {key_of(field)} instead')
    router = MODELS.build(router_cfg, default_args=dict(
        scene_dim=scene_dim, instance_dim=instance_dim, key_of=key_of, **settings))
    if not isinstance(router, HierarchicalRouter):
        raise MoEConfigError(f'{owner_key}.router.type', router_cfg.get('type'),
                             'must be a HierarchicalRouter')
    return router


def routing_losses(losses: Mapping[str, Optional[RoutingLoss]],
                   routings: Sequence[Routing]) -> Dict[str, Tensor]:
    """The weighted ``loss_moe_*`` terms of training ``routings`` (one per MoE block), each the
    mean over the blocks, so a weight means the same for one block or many."""
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
