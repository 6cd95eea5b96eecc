"""The ``moe=dict(...)`` entry of the HI-MoE DETR-family detectors, checked and parsed by a pure
function (it builds nothing); every error names the ``moe.<key>`` the user wrote."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ..core import UPCYCLE_MODES, MoEConfigError, check_noise_std

#: How errors name the detector's ``moe`` settings.
MOE_KEY = 'moe'

#: Default routing-loss entries (``moe.loss_balance``, ``moe.loss_router_z``).
DEFAULT_LOSSES = dict(
    loss_balance=dict(type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01),
    loss_router_z=dict(type='RouterZLoss', loss_weight=0.001))

#: Every key of the ``moe`` entry (``loss_scene`` only to say that DETRs do not support it).
KNOWN_KEYS = ('encoder_layers', 'decoder_layers', 'router', 'shared_expert',
              'shared_expert_weight', 'expert_channels', 'loss_balance', 'loss_router_z',
              'loss_scene', 'upcycle', 'stats_period')


@dataclass(frozen=True)
class DetrMoESettings:
    """A checked ``moe`` entry.

    Attributes:
        layers: ``{'encoder': (indices...), 'decoder': (...)}``, sorted layer indices whose FFN
            becomes an MoE FFN (at least one in total).
        router: the ``HierarchicalRouter`` entry (one router per MoE layer is built from it).
        shared_expert, shared_expert_weight: the owner's ``MoEConfig`` fields (checked there).
        expert_channels: hidden width of an expert; None: derived from the FFN.
        losses: routing-loss entries by name (``loss_balance``, ``loss_router_z``); None: off.
        upcycle_mode, upcycle_noise_std: how a dense checkpoint's FFNs become experts.
        stats_period: iterations between routing-statistics writes without the hook.
    """

    layers: Dict[str, Tuple[int, ...]]
    router: Dict[str, Any]
    shared_expert: Any
    shared_expert_weight: Any
    expert_channels: Optional[int]
    losses: Dict[str, Optional[Dict[str, Any]]]
    upcycle_mode: str
    upcycle_noise_std: float
    stats_period: int

    @property
    def owner_settings(self) -> Dict[str, Any]:
        """The ``MoEConfig`` fields set by the ``moe`` entry itself, not by ``moe.router``."""
        return dict(shared_expert=self.shared_expert, shared_expert_weight=self.shared_expert_weight)

    def expert_channels_of(self, feedforward_channels: int, num_experts: int) -> int:
        """Hidden width of an expert of an FFN of ``feedforward_channels``: ``expert_channels``,
        else the FFN's; split upcycling: ``feedforward_channels / num_experts``."""
        if self.upcycle_mode != 'split':
            return feedforward_channels if self.expert_channels is None else self.expert_channels
        split = feedforward_channels // num_experts
        if feedforward_channels % num_experts:
            raise MoEConfigError(f'{MOE_KEY}.upcycle.mode', 'split',
                                 f'feedforward_channels={feedforward_channels} is not divisible by '
                                 f'num_experts={num_experts}')
        if self.expert_channels not in (None, split):
            raise MoEConfigError(f'{MOE_KEY}.expert_channels', self.expert_channels,
                                 f'split upcycling gives experts of {feedforward_channels} / '
                                 f'{num_experts} = {split} channels')
        return split


def parse_detr_moe_settings(moe: Mapping[str, Any], num_encoder_layers: int,
                            num_decoder_layers: int) -> DetrMoESettings:
    """Check the ``moe`` entry of a detector with these layer counts and fill in the defaults."""
    if not isinstance(moe, Mapping):
        raise MoEConfigError(MOE_KEY, moe, 'must be a dict of HI-MoE settings')
    for key in moe:
        if key not in KNOWN_KEYS:
            raise MoEConfigError(f'{MOE_KEY}.{key}', moe[key],
                                 f'unknown setting; known: {sorted(KNOWN_KEYS)}')
    if moe.get('loss_scene') is not None:
        raise MoEConfigError(f'{MOE_KEY}.loss_scene', moe['loss_scene'],
                             'super-class supervision is available for RoI heads only')
    stats_period = _positive_int(moe.get('stats_period', 50), 'stats_period')
    expert_channels = moe.get('expert_channels')
    if expert_channels is not None:
        expert_channels = _positive_int(expert_channels, 'expert_channels', ' (or None)')
    mode, noise_std = _upcycle(moe.get('upcycle'))
    router = moe.get('router', dict(type='HierarchicalRouter'))
    if not isinstance(router, Mapping):
        raise MoEConfigError(f'{MOE_KEY}.router', router,
                             'must be a dict of HierarchicalRouter settings, e.g. '
                             'dict(num_experts=8, top_k=2, num_groups=4, scene_top_k=2)')
    losses = {}
    for name, default in DEFAULT_LOSSES.items():
        losses[name] = moe.get(name, default)
        if losses[name] is not None and not isinstance(losses[name], Mapping):
            raise MoEConfigError(f'{MOE_KEY}.{name}', losses[name],
                                 'must be a loss config dict (or None to disable it)')
    layers = {'encoder': _layer_indices(moe.get('encoder_layers', 'all'), num_encoder_layers,
                                        'encoder_layers'),
              'decoder': _layer_indices(moe.get('decoder_layers', 'all'), num_decoder_layers,
                                        'decoder_layers')}
    if not any(layers.values()):
        raise MoEConfigError(f'{MOE_KEY}.encoder_layers', moe.get('encoder_layers'),
                             'no MoE layer: choose encoder and/or decoder layers')
    return DetrMoESettings(
        layers=layers, router=dict(router), shared_expert=moe.get('shared_expert', False),
        shared_expert_weight=moe.get('shared_expert_weight', 0.5),
        expert_channels=expert_channels, losses=losses, upcycle_mode=mode,
        upcycle_noise_std=noise_std, stats_period=stats_period)


def _positive_int(value: Any, name: str, alternative: str = '') -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoEConfigError(f'{MOE_KEY}.{name}', value, f'must be an integer >= 1{alternative}')
    return value


def _upcycle(upcycle: Any) -> Tuple[str, float]:
    """(mode, noise_std) of the ``upcycle`` entry (None: copy without noise)."""
    if upcycle is None:
        upcycle = {}
    if not isinstance(upcycle, Mapping):
        raise MoEConfigError(f'{MOE_KEY}.upcycle', upcycle,
                             "must be a dict like dict(mode='copy', noise_std=0.0) (or None)")
    unknown = sorted(set(upcycle) - {'mode', 'noise_std'})
    if unknown:
        raise MoEConfigError(f'{MOE_KEY}.upcycle', unknown, "unknown keys; known: ['mode', 'noise_std']")
    mode = upcycle.get('mode', 'copy')
    if mode not in UPCYCLE_MODES:
        raise MoEConfigError(f'{MOE_KEY}.upcycle.mode', mode, f'must be one of {UPCYCLE_MODES}')
    return mode, check_noise_std(upcycle.get('noise_std', 0.0), f'{MOE_KEY}.upcycle.noise_std')


def _layer_indices(value: Any, num_layers: int, name: str) -> Tuple[int, ...]:
    """Sorted unique indices of ``'all'`` or a list/tuple of indices into ``num_layers``."""
    if value == 'all':
        return tuple(range(num_layers))
    if not isinstance(value, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise MoEConfigError(f'{MOE_KEY}.{name}', value,
                             "must be 'all' or a list of layer indices (e.g. [0, 2]; [] for none)")
    indices = tuple(sorted(set(value)))
    if indices and (indices[0] < 0 or indices[-1] >= num_layers):
        raise MoEConfigError(f'{MOE_KEY}.{name}', value,
                             f'layer indices must be in 0..{num_layers - 1}')
    return indices
