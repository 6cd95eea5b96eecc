"""Layers of the HI-MoE DETR family: ``MoEFFN`` (a drop-in for mmcv's ``FFN`` whose fc layers
are the experts of a core ``MoEBlock``), ``TokenRouting`` (which tokens of one encoder or
decoder pass it routes) and the stock encoder / decoder layers with a ``MoEFFN``.

The token context of a pass is passed explicitly, as the ``moe_tokens`` argument, down to the
FFN. Where stock code calls a child without it (``self.ffn(query)`` in a layer's ``forward``,
``self.encoder(...)`` in a detector's ``forward_encoder``), ``call_stock`` runs that stock code
unchanged with the child bound to the pass's arguments for this one call: nothing is written on
any module during a forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from mmcv.cnn.bricks.drop import build_dropout
from mmdet.models.layers.transformer import (DeformableDetrTransformerDecoderLayer,
                                             DeformableDetrTransformerEncoderLayer,
                                             DetrTransformerDecoderLayer,
                                             DetrTransformerEncoderLayer)
from mmdet.utils import OptConfigType
from mmengine.logging import print_log
from torch import Tensor, nn

from ..core import HierarchicalRouter, MoEBlock, MoEConfig, MoEConfigError, Routing, masked_token_mean


@dataclass
class TokenRouting:
    """Which tokens of one encoder or decoder pass the MoE FFNs route, for a batch of B images
    of T tokens each, and where their ``Routing`` results go.

    Attributes:
        routed: (M,) long, flat indices into the B*T tokens of the routed ones; None: all.
        image_index: (M,) long, image of each routed token.
        counted: (B, T) bool, tokens that enter the scene descriptor, the balance losses and the
            statistics (real image tokens; matching queries, not DN queries).
        counted_routed: (M,) bool, ``counted`` of the routed tokens; None: all routed count.
        routings: every MoE FFN of the pass appends its ``Routing`` here.
    """

    routed: Optional[Tensor]
    image_index: Tensor
    counted: Tensor
    counted_routed: Optional[Tensor]
    routings: List[Routing] = field(default_factory=list)

    @classmethod
    def of_tokens(cls, counted: Tensor, route_uncounted: bool,
                  routings: List[Routing]) -> 'TokenRouting':
        """Routing context of tokens (B, T): ``counted`` as above; uncounted tokens are routed
        when ``route_uncounted`` (DN queries), else skipped (padding)."""
        batch, tokens = counted.shape
        image_of_token = torch.arange(batch, device=counted.device).repeat_interleave(tokens)
        if route_uncounted:
            all_count = bool(counted.all())
            return cls(None, image_of_token, counted, None if all_count else counted.flatten(),
                       routings)
        routed = counted.flatten().nonzero().squeeze(1)
        return cls(routed, image_of_token[routed], counted, None, routings)


class MoEFFN(nn.Module):
    """Drop-in for mmcv's ``FFN`` (two fc layers, ReLU, residual, dropout) whose fc layers are
    HI-MoE experts. ``forward(x (B, T, C), tokens: TokenRouting) -> (B, T, C)``.

    Children (checkpoint keys): ``moe_block`` (a core ``MoEBlock``: ``moe_block.router``,
    ``moe_block.moe``). Checkpoints written while ``MoEFFN`` was itself the block (keys
    ``router.*``, ``moe.*``) load unchanged; a dense FFN (mmcv keys ``layers.0.0``,
    ``layers.1``) is upcycled into the experts on loading.

    Args:
        router: the layer's hierarchical router.
        embed_dims: C.
        expert_channels: hidden width of each expert.
        feedforward_channels: hidden width of the dense FFN (the shared expert's).
        ffn_drop: dropout after the hidden activation and after the output, as in ``FFN``.
        dropout_layer: the FFN's ``dropout_layer`` config (applied before the residual).
        add_identity: add the residual, as in ``FFN``.
        stats_scope: name of the layer in statistics, e.g. ``encoder.3``.
        upcycle_mode / upcycle_noise_std: how a dense checkpoint's FFN becomes the experts.
    """

    def __init__(self, router: HierarchicalRouter, embed_dims: int, expert_channels: int,
                 feedforward_channels: int, ffn_drop: float = 0.0,
                 dropout_layer: OptConfigType = None, add_identity: bool = True,
                 stats_scope: str = '', upcycle_mode: str = 'copy',
                 upcycle_noise_std: float = 0.0) -> None:
        super().__init__()
        self.moe_block = MoEBlock(router, [embed_dims, expert_channels, embed_dims],
                                  activate_output=False, stats_scope=stats_scope,
                                  shared_dims=[embed_dims, feedforward_channels, embed_dims],
                                  hidden_dropout=ffn_drop)
        self.output_dropout = nn.Dropout(ffn_drop)
        self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()
        self.add_identity = add_identity
        self.upcycle_mode = upcycle_mode
        self.upcycle_noise_std = upcycle_noise_std
        self.upcycle_report: List[str] = []

    @property
    def config(self) -> MoEConfig:
        return self.moe_block.config

    @property
    def stats_scope(self) -> str:
        """Name of the layer in statistics and analyses, e.g. ``decoder.5``."""
        return self.moe_block.stats_scope

    def forward(self, x: Tensor, tokens: TokenRouting) -> Tensor:
        batch, length, channels = x.shape
        scene = masked_token_mean(x, tokens.counted)
        flat = x.reshape(batch * length, channels)
        routed = flat if tokens.routed is None else flat.index_select(0, tokens.routed)
        out, routing = self.moe_block(routed, scene, tokens.image_index,
                                      counted=tokens.counted_routed)
        tokens.routings.append(routing)
        if tokens.routed is not None:
            out = out.new_zeros(batch * length, channels).index_copy(0, tokens.routed, out)
        out = self.dropout_layer(self.output_dropout(out.view(batch, length, channels)))
        return x + out if self.add_identity else out

    def reset_parameters(self) -> None:
        """Every expert like the dense FFN it replaces (Xavier, as DETR detectors initialise
        transformer weights) and the router at its near-neutral start."""
        for weight in self.moe_block.moe.experts.weights:
            for expert_weight in weight.data:
                nn.init.xavier_uniform_(expert_weight)
        self.moe_block.router.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        MoEBlock.adopt_flat_keys(state_dict, prefix, 'moe_block')
        report = self.moe_block.upcycle(state_dict, f'{prefix}moe_block.',
                                        [f'{prefix}layers.0.0', f'{prefix}layers.1'],
                                        mode=self.upcycle_mode, noise_std=self.upcycle_noise_std)
        if report:
            self.upcycle_report = report
            print_log(f'HI-MoE {self.stats_scope}: upcycled the dense FFN ({self.upcycle_mode}): '
                      + '; '.join(report), logger='current')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_ffn_cfg(ffn_cfg: Dict[str, Any], key: str) -> None:
    """Fail, naming ``<key>.<entry>``, unless a stock FFN of ``ffn_cfg`` is what ``MoEFFN``
    replaces: two fc layers with ReLU, no layer scale."""
    if ffn_cfg.get('num_fcs', 2) != 2:
        raise MoEConfigError(f'{key}.num_fcs', ffn_cfg['num_fcs'], 'MoE FFNs have 2 fc layers')
    act = dict(ffn_cfg.get('act_cfg', dict(type='ReLU')))
    if act.get('type') != 'ReLU':
        raise MoEConfigError(f'{key}.act_cfg', act, 'MoE FFN experts use ReLU')
    if ffn_cfg.get('layer_scale_init_value', 0.0):
        raise MoEConfigError(f'{key}.layer_scale_init_value', ffn_cfg['layer_scale_init_value'],
                             'not supported by MoE FFNs')


class _CallView:
    """A module as one call of a stock method sees it: every attribute is the module's, except
    the ``children`` given, callables standing in for the module's children in this call."""

    def __init__(self, module: nn.Module, children: Dict[str, Callable]) -> None:
        self._module = module
        self.__dict__.update(children)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def call_stock(method: Callable, module: nn.Module, children: Dict[str, Callable], *args,
               **kwargs) -> Any:
    """Run ``method``, a stock class's function (e.g. ``DetrTransformerEncoderLayer.forward``),
    on ``module``, with the stock code's calls of the children named in ``children`` going to the
    given callables (e.g. the child with this pass's extra arguments bound)."""
    return method(_CallView(module, children), *args, **kwargs)


class _MoELayer:
    """Mixin (before a stock encoder / decoder layer class) for a layer whose ``ffn`` is a
    ``MoEFFN``: the stock ``forward`` plus the keyword argument ``moe_tokens`` (TokenRouting)
    that the FFN receives."""

    def forward(self, *args, moe_tokens: TokenRouting, **kwargs) -> Tensor:
        def ffn(query: Tensor) -> Tensor:
            return self.ffn(query, moe_tokens)

        return call_stock(super().forward.__func__, self, dict(ffn=ffn), *args, **kwargs)


class MoEDetrEncoderLayer(_MoELayer, DetrTransformerEncoderLayer):
    """DETR encoder layer with an HI-MoE FFN."""


class MoEDeformableEncoderLayer(_MoELayer, DeformableDetrTransformerEncoderLayer):
    """Deformable DETR / DINO encoder layer with an HI-MoE FFN."""


class MoEDetrDecoderLayer(_MoELayer, DetrTransformerDecoderLayer):
    """DETR decoder layer with an HI-MoE FFN."""


class MoEDeformableDecoderLayer(_MoELayer, DeformableDetrTransformerDecoderLayer):
    """Deformable DETR / DINO decoder layer with an HI-MoE FFN."""


#: Stock layer class -> its HI-MoE version.
MOE_LAYERS = {
    DetrTransformerEncoderLayer: MoEDetrEncoderLayer,
    DeformableDetrTransformerEncoderLayer: MoEDeformableEncoderLayer,
    DetrTransformerDecoderLayer: MoEDetrDecoderLayer,
    DeformableDetrTransformerDecoderLayer: MoEDeformableDecoderLayer,
}
