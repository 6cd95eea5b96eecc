"""HI-MoE for DETR-family detectors: chosen encoder/decoder FFNs become hierarchical MoE FFNs.

``HIMoEDINO``, ``HIMoEDeformableDETR`` and ``HIMoEDETR`` are the stock detectors plus one
``moe=dict(...)`` entry. Every MoE FFN is a core ``MoEBlock`` that routes the tokens of a layer:

- encoder: the image tokens, padding excluded (it is neither routed nor pooled: padded tokens
  keep the residual only, and no real token ever attends to them);
- decoder: the object queries. DINO's denoising (DN) queries are routed and computed (the experts
  learn denoising) but never enter the scene descriptor, the balance losses or the statistics.

The scene descriptor of an image is, per MoE layer, the mean of its counted input tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmcv.cnn.bricks.drop import build_dropout
from mmdet.models.detectors import DETR, DINO, DeformableDETR
from mmdet.models.layers.transformer import (DeformableDetrTransformerDecoderLayer,
                                             DeformableDetrTransformerEncoderLayer,
                                             DetrTransformerDecoderLayer,
                                             DetrTransformerEncoderLayer)
from mmdet.registry import MODELS
from mmdet.structures import OptSampleList, SampleList
from mmdet.utils import ConfigType, OptConfigType
from mmengine.logging import print_log
from torch import Tensor, nn

from ..core import (UPCYCLE_MODES, HierarchicalRouter, MoEBlock, MoEConfigError, Routing,
                    check_noise_std, masked_token_mean)
from .moe_settings import (build_router, build_routing_losses, log_routing_statistics,
                           routing_losses)

#: How errors name the detector's ``moe`` settings.
MOE_KEY = 'moe'


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


class MoEFFN(MoEBlock):
    """Drop-in for mmcv's ``FFN`` (two fc layers, ReLU, residual, dropout) whose fc layers are
    HI-MoE experts. ``forward(x (B, T, C), tokens: TokenRouting) -> (B, T, C)``.

    Args:
        router: the layer's hierarchical router.
        embed_dims: C.
        expert_channels: hidden width of each expert.
        feedforward_channels: hidden width of the dense FFN (the shared expert's).
        ffn_drop: dropout after the hidden activation and after the output, as in ``FFN``.
        dropout_layer: the FFN's ``dropout_layer`` config (applied before the residual).
        add_identity: add the residual, as in ``FFN``.
        stats_scope: name of the layer in statistics, e.g. ``encoder.3``.
        upcycle_mode / upcycle_noise_std: how a dense checkpoint's FFN (mmcv keys
            ``layers.0.0``, ``layers.1``) becomes the experts on loading.
    """

    def __init__(self, router: HierarchicalRouter, embed_dims: int, expert_channels: int,
                 feedforward_channels: int, ffn_drop: float = 0.0,
                 dropout_layer: OptConfigType = None, add_identity: bool = True,
                 stats_scope: str = '', upcycle_mode: str = 'copy',
                 upcycle_noise_std: float = 0.0) -> None:
        super().__init__(router, [embed_dims, expert_channels, embed_dims], activate_output=False,
                         stats_scope=stats_scope,
                         shared_dims=[embed_dims, feedforward_channels, embed_dims],
                         hidden_dropout=ffn_drop)
        self.output_dropout = nn.Dropout(ffn_drop)
        self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()
        self.add_identity = add_identity
        self.upcycle_mode = upcycle_mode
        self.upcycle_noise_std = upcycle_noise_std
        self.upcycle_report: List[str] = []

    def forward(self, x: Tensor, tokens: TokenRouting) -> Tensor:  # type: ignore[override]
        batch, length, channels = x.shape
        scene = masked_token_mean(x, tokens.counted)
        flat = x.reshape(batch * length, channels)
        routed = flat if tokens.routed is None else flat.index_select(0, tokens.routed)
        out, routing = super().forward(routed, scene, tokens.image_index,
                                       counted=tokens.counted_routed)
        tokens.routings.append(routing)
        if tokens.routed is not None:
            out = out.new_zeros(batch * length, channels).index_copy(0, tokens.routed, out)
        out = self.dropout_layer(self.output_dropout(out.view(batch, length, channels)))
        return x + out if self.add_identity else out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A dense DETR checkpoint holds mmcv FFN keys: layers.0.0 (fc1) and layers.1 (fc2).
        report = self.upcycle(state_dict, prefix, [f'{prefix}layers.0.0', f'{prefix}layers.1'],
                              mode=self.upcycle_mode, noise_std=self.upcycle_noise_std)
        if report:
            self.upcycle_report = report
            print_log(f'HI-MoE {self.stats_scope}: upcycled the dense FFN ({self.upcycle_mode}): '
                      + '; '.join(report), logger='current')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _MoEEncoderLayer:
    """Encoder layer whose FFN is a ``MoEFFN`` (forward of ``DetrTransformerEncoderLayer``)."""

    def forward(self, query: Tensor, query_pos: Tensor, key_padding_mask: Tensor,
                moe_tokens: TokenRouting, **kwargs) -> Tensor:
        query = self.self_attn(query=query, key=query, value=query, query_pos=query_pos,
                               key_pos=query_pos, key_padding_mask=key_padding_mask, **kwargs)
        query = self.norms[0](query)
        query = self.ffn(query, moe_tokens)
        return self.norms[1](query)


class _MoEDecoderLayer:
    """Decoder layer whose FFN is a ``MoEFFN`` (forward of ``DetrTransformerDecoderLayer``)."""

    def forward(self, query: Tensor, key: Tensor = None, value: Tensor = None,
                query_pos: Tensor = None, key_pos: Tensor = None, self_attn_mask: Tensor = None,
                cross_attn_mask: Tensor = None, key_padding_mask: Tensor = None,
                moe_tokens: Optional[TokenRouting] = None, **kwargs) -> Tensor:
        query = self.self_attn(query=query, key=query, value=query, query_pos=query_pos,
                               key_pos=query_pos, attn_mask=self_attn_mask, **kwargs)
        query = self.norms[0](query)
        query = self.cross_attn(query=query, key=key, value=value, query_pos=query_pos,
                                key_pos=key_pos, attn_mask=cross_attn_mask,
                                key_padding_mask=key_padding_mask, **kwargs)
        query = self.norms[1](query)
        query = self.ffn(query, moe_tokens)
        return self.norms[2](query)


class MoEDetrEncoderLayer(_MoEEncoderLayer, DetrTransformerEncoderLayer):
    """DETR encoder layer with an HI-MoE FFN."""


class MoEDeformableEncoderLayer(_MoEEncoderLayer, DeformableDetrTransformerEncoderLayer):
    """Deformable DETR / DINO encoder layer with an HI-MoE FFN."""


class MoEDetrDecoderLayer(_MoEDecoderLayer, DetrTransformerDecoderLayer):
    """DETR decoder layer with an HI-MoE FFN."""


class MoEDeformableDecoderLayer(_MoEDecoderLayer, DeformableDetrTransformerDecoderLayer):
    """Deformable DETR / DINO decoder layer with an HI-MoE FFN."""


#: Stock layer class -> its HI-MoE version.
MOE_LAYERS = {
    DetrTransformerEncoderLayer: MoEDetrEncoderLayer,
    DeformableDetrTransformerEncoderLayer: MoEDeformableEncoderLayer,
    DetrTransformerDecoderLayer: MoEDetrDecoderLayer,
    DeformableDetrTransformerDecoderLayer: MoEDeformableDecoderLayer,
}


class HIMoEDetrMixin:
    """What a DETR-family detector needs for HI-MoE FFNs (mixed in before the stock class).

    ``moe`` settings (errors name ``moe.<key>``):

    - ``encoder_layers`` / ``decoder_layers``: indices of the layers whose FFN becomes an MoE
      FFN, or ``'all'``; ``[]`` for none (at least one layer in total).
    - ``router``: ``HierarchicalRouter`` settings (experts, top-k, groups, scene top-k, ...),
      one router per MoE layer.
    - ``shared_expert``, ``shared_expert_weight``: an always-on dense FFN next to the experts.
    - ``expert_channels``: hidden width of an expert (None: the FFN's; split mode: FFN / E).
    - ``loss_balance``, ``loss_router_z``: routing-loss entries (None disables); the
      ``loss_moe_*`` terms are the mean over the MoE layers.
    - ``upcycle``: ``dict(mode='copy' | 'split', noise_std=0.0)``, how a dense checkpoint's
      FFNs become experts (see ``himoe_plugin.core.upcycle``).
    - ``stats_period``: write routing statistics (``himoe/encoder.<i>/...``) to the message
      hub every this many training iterations.
    """

    def _build_moe(self, moe: ConfigType) -> None:
        settings = dict(moe)
        known = {'encoder_layers', 'decoder_layers', 'router', 'shared_expert',
                 'shared_expert_weight', 'expert_channels', 'loss_balance', 'loss_router_z',
                 'loss_scene', 'upcycle', 'stats_period'}
        for key in settings:
            if key not in known:
                raise MoEConfigError(f'{MOE_KEY}.{key}', settings[key],
                                     f'unknown setting; known: {sorted(known)}')
        if settings.get('loss_scene') is not None:
            raise MoEConfigError(f'{MOE_KEY}.loss_scene', settings['loss_scene'],
                                 'super-class supervision is available for RoI heads only')
        stats_period = settings.get('stats_period', 50)
        if isinstance(stats_period, bool) or not isinstance(stats_period, int) or stats_period < 1:
            raise MoEConfigError(f'{MOE_KEY}.stats_period', stats_period,
                                 'must be an integer >= 1')
        self.moe_stats_period = stats_period
        upcycle = dict(settings.get('upcycle') or {})
        mode = upcycle.pop('mode', 'copy')
        if mode not in UPCYCLE_MODES:
            raise MoEConfigError(f'{MOE_KEY}.upcycle.mode', mode, f'must be one of {UPCYCLE_MODES}')
        noise_std = check_noise_std(upcycle.pop('noise_std', 0.0), f'{MOE_KEY}.upcycle.noise_std')
        if upcycle:
            raise MoEConfigError(f'{MOE_KEY}.upcycle', sorted(upcycle),
                                 "unknown keys; known: ['mode', 'noise_std']")

        self.moe_losses = nn.ModuleDict({
            name: loss for name, loss in build_routing_losses(MOE_KEY, dict(
                loss_balance=settings.get('loss_balance', dict(
                    type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01)),
                loss_router_z=settings.get('loss_router_z', dict(
                    type='RouterZLoss', loss_weight=0.001)))).items() if loss is not None})
        owner_settings = dict(shared_expert=settings.get('shared_expert', False),
                              shared_expert_weight=settings.get('shared_expert_weight', 0.5))
        router_cfg = settings.get('router', dict(type='HierarchicalRouter'))
        losses = {name: self.moe_losses[name] if name in self.moe_losses else None
                  for name in ('loss_balance', 'loss_router_z', 'loss_scene')}

        chosen = 0
        for part in ('encoder', 'decoder'):
            coder = getattr(self, part)
            indices = _layer_indices(settings.get(f'{part}_layers', 'all'), len(coder.layers),
                                     f'{MOE_KEY}.{part}_layers')
            for index in indices:
                coder.layers[index] = self._moe_layer(
                    coder, index, f'{part}.{index}', router_cfg, losses, owner_settings,
                    settings.get('expert_channels'), mode, noise_std)
            chosen += len(indices)
        if chosen == 0:
            raise MoEConfigError(f'{MOE_KEY}.encoder_layers', settings.get('encoder_layers'),
                                 'no MoE layer: choose encoder and/or decoder layers')

    def _moe_layer(self, coder: nn.Module, index: int, scope: str, router_cfg: ConfigType,
                   losses: Dict, owner_settings: Dict, expert_channels: Optional[int],
                   upcycle_mode: str, upcycle_noise_std: float) -> nn.Module:
        """The HI-MoE version of ``coder.layers[index]`` (same config, MoE FFN)."""
        stock = coder.layers[index]
        layer_type = MOE_LAYERS.get(type(stock))
        if layer_type is None:
            raise MoEConfigError(f'{MOE_KEY}.{scope.split(".")[0]}_layers', index,
                                 f'{type(stock).__name__} is not supported; supported layers: '
                                 f'{sorted(t.__name__ for t in MOE_LAYERS)}')
        ffn_cfg = dict(coder.layer_cfg.get('ffn_cfg', {}))
        key = f'{scope.split(".")[0]}.layer_cfg.ffn_cfg'
        if ffn_cfg.get('num_fcs', 2) != 2:
            raise MoEConfigError(f'{key}.num_fcs', ffn_cfg['num_fcs'], 'MoE FFNs have 2 fc layers')
        act = dict(ffn_cfg.get('act_cfg', dict(type='ReLU')))
        if act.get('type') != 'ReLU':
            raise MoEConfigError(f'{key}.act_cfg', act, 'MoE FFN experts use ReLU')
        if ffn_cfg.get('layer_scale_init_value', 0.0):
            raise MoEConfigError(f'{key}.layer_scale_init_value',
                                 ffn_cfg['layer_scale_init_value'], 'not supported by MoE FFNs')
        embed_dims = stock.ffn.embed_dims
        hidden = stock.ffn.feedforward_channels
        router = build_router(MOE_KEY, router_cfg, losses, owner_settings,
                              scene_dim=embed_dims, instance_dim=embed_dims)
        num_experts = router.config.num_experts
        if upcycle_mode == 'split':
            if hidden % num_experts:
                raise MoEConfigError(f'{MOE_KEY}.upcycle.mode', 'split',
                                     f'feedforward_channels={hidden} is not divisible by '
                                     f'num_experts={num_experts}')
            if expert_channels not in (None, hidden // num_experts):
                raise MoEConfigError(f'{MOE_KEY}.expert_channels', expert_channels,
                                     f'split upcycling gives experts of {hidden} / '
                                     f'{num_experts} = {hidden // num_experts} channels')
            expert_channels = hidden // num_experts
        elif expert_channels is None:
            expert_channels = hidden
        elif isinstance(expert_channels, bool) or not isinstance(expert_channels, int) \
                or expert_channels < 1:
            raise MoEConfigError(f'{MOE_KEY}.expert_channels', expert_channels,
                                 'must be a positive integer (or None)')
        layer = layer_type(**coder.layer_cfg)
        layer.ffn = MoEFFN(router, embed_dims, expert_channels, hidden,
                           ffn_drop=float(ffn_cfg.get('ffn_drop', 0.0)),
                           dropout_layer=ffn_cfg.get('dropout_layer'),
                           add_identity=ffn_cfg.get('add_identity', True), stats_scope=scope,
                           upcycle_mode=upcycle_mode, upcycle_noise_std=upcycle_noise_std)
        return layer

    @property
    def moe_ffns(self) -> List[MoEFFN]:
        """The MoE FFNs, encoder first."""
        return [m for m in self.modules() if isinstance(m, MoEFFN)]

    def init_weights(self) -> None:
        """Stock init, then every expert like the dense FFN it replaces (Xavier, as DETR
        detectors initialise transformer weights) and routers at their near-neutral start."""
        super().init_weights()
        for ffn in self.moe_ffns:
            for weight in ffn.moe.experts.weights:
                for expert_weight in weight.data:
                    nn.init.xavier_uniform_(expert_weight)
            ffn.router.reset_parameters()

    # ---- forward: the stock flow, plus the token contexts and the routing losses ----

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> Dict[str, Tensor]:
        """Stock losses plus ``loss_moe_*`` (mean over the MoE layers)."""
        img_feats = self.extract_feat(batch_inputs)
        head_inputs, routings = self.forward_transformer(img_feats, batch_data_samples)
        losses = self.bbox_head.loss(**head_inputs, batch_data_samples=batch_data_samples)
        losses.update(routing_losses(self.moe_losses, routings))
        log_routing_statistics(self, self.moe_stats_period)
        return losses

    def predict(self, batch_inputs: Tensor, batch_data_samples: SampleList,
                rescale: bool = True) -> SampleList:
        """Stock predictions; with ``test_cfg.output_routing=True`` every ``pred_instances`` also
        holds ``experts`` (n, k) long and ``expert_weights`` (n, k) float: the routing of the
        object query each prediction came from, in the last MoE decoder layer."""
        img_feats = self.extract_feat(batch_inputs)
        head_inputs, routings = self.forward_transformer(img_feats, batch_data_samples)
        results_list = self.bbox_head.predict(**head_inputs, rescale=rescale,
                                              batch_data_samples=batch_data_samples)
        if (self.test_cfg or {}).get('output_routing', False):
            self._add_query_routing(results_list, head_inputs, routings)
        return self.add_pred_to_datasample(batch_data_samples, results_list)

    def _add_query_routing(self, results_list: List, head_inputs: Dict,
                           routings: List[Routing]) -> None:
        decoder_layers = sum(ffn.stats_scope.startswith('decoder') for ffn in self.moe_ffns)
        if decoder_layers == 0:
            raise MoEConfigError('test_cfg.output_routing', True,
                                 'predictions come from decoder queries, but no decoder layer is '
                                 'an MoE layer (moe.decoder_layers)')
        routing = routings[-1]  # the last MoE decoder layer routes every query of every image
        cls_scores = self.bbox_head(**head_inputs)[0][-1]  # (B, Q, C) of the last decoder layer
        num_queries = cls_scores.shape[1]
        for image, results in enumerate(results_list):
            rows = image * num_queries + self._query_of_predictions(cls_scores[image])
            results.experts = routing.expert_index[rows]
            results.expert_weights = routing.combine_weight[rows].float()

    def _query_of_predictions(self, cls_score: Tensor) -> Tensor:
        """(n,) the query of each of one image's predictions, selected as the stock
        ``DETRHead._predict_by_feat_single`` selects them (top ``max_per_img`` scores)."""
        max_per_img = self.bbox_head.test_cfg.get('max_per_img', len(cls_score))
        if self.bbox_head.loss_cls.use_sigmoid:
            indexes = cls_score.sigmoid().view(-1).topk(max_per_img).indices
            return indexes // self.bbox_head.num_classes
        scores = cls_score.softmax(dim=-1)[..., :-1].max(dim=-1).values
        return scores.topk(max_per_img).indices

    def _forward(self, batch_inputs: Tensor,
                 batch_data_samples: OptSampleList = None) -> Tuple[List[Tensor]]:
        img_feats = self.extract_feat(batch_inputs)
        head_inputs, _ = self.forward_transformer(img_feats, batch_data_samples)
        return self.bbox_head.forward(**head_inputs)

    def forward_transformer(self, img_feats: Tuple[Tensor], batch_data_samples: OptSampleList = None
                            ) -> Tuple[Dict, List[Routing]]:
        """The stock pre_transformer -> encoder -> pre_decoder -> decoder flow; returns the head
        inputs and the ``Routing`` of every MoE FFN (encoder first)."""
        routings: List[Routing] = []
        encoder_inputs, decoder_inputs = self.pre_transformer(img_feats, batch_data_samples)
        feat, padding = encoder_inputs['feat'], encoder_inputs['feat_mask']
        real = (torch.ones(feat.shape[:2], dtype=torch.bool, device=feat.device)
                if padding is None else ~padding)  # None: no image of the batch is padded
        image_tokens = TokenRouting.of_tokens(real, route_uncounted=False, routings=routings)
        encoder_outputs = self.forward_encoder(**encoder_inputs, moe_tokens=image_tokens)
        decoder_extra, head_inputs = self._pre_decoder(encoder_outputs, batch_data_samples)
        decoder_inputs.update(decoder_extra)
        queries = decoder_inputs['query']
        matching = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        dn_meta = head_inputs.get('dn_meta')
        if dn_meta is not None:
            matching[:, :dn_meta['num_denoising_queries']] = False
        query_tokens = TokenRouting.of_tokens(matching, route_uncounted=True, routings=routings)
        head_inputs.update(self.forward_decoder(**decoder_inputs, moe_tokens=query_tokens))
        return head_inputs, routings

    def _pre_decoder(self, encoder_outputs: Dict, batch_data_samples: OptSampleList) -> Tuple:
        return self.pre_decoder(**encoder_outputs)


@MODELS.register_module()
class HIMoEDINO(HIMoEDetrMixin, DINO):
    """DINO with HI-MoE FFNs in the chosen encoder and decoder layers (the HI-MoE paper's
    setting). Args: those of ``DINO`` plus ``moe`` (see ``HIMoEDetrMixin``)."""

    def __init__(self, *args, moe: ConfigType, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._build_moe(moe)

    def _pre_decoder(self, encoder_outputs: Dict, batch_data_samples: OptSampleList) -> Tuple:
        return self.pre_decoder(**encoder_outputs, batch_data_samples=batch_data_samples)

    def forward_encoder(self, feat: Tensor, feat_mask: Tensor, feat_pos: Tensor,
                        spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                        moe_tokens: TokenRouting) -> Dict:
        return _deformable_encoder(self, feat, feat_mask, feat_pos, spatial_shapes,
                                   level_start_index, valid_ratios, moe_tokens)


@MODELS.register_module()
class HIMoEDeformableDETR(HIMoEDetrMixin, DeformableDETR):
    """Deformable DETR with HI-MoE FFNs. Args: those of ``DeformableDETR`` plus ``moe``."""

    def __init__(self, *args, moe: ConfigType, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._build_moe(moe)

    def forward_encoder(self, feat: Tensor, feat_mask: Tensor, feat_pos: Tensor,
                        spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                        moe_tokens: TokenRouting) -> Dict:
        return _deformable_encoder(self, feat, feat_mask, feat_pos, spatial_shapes,
                                   level_start_index, valid_ratios, moe_tokens)

    def forward_decoder(self, query: Tensor, query_pos: Tensor, memory: Tensor,
                        memory_mask: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                        level_start_index: Tensor, valid_ratios: Tensor,
                        moe_tokens: TokenRouting) -> Dict:
        inter_states, inter_references = self.decoder(
            query=query, value=memory, query_pos=query_pos, key_padding_mask=memory_mask,
            reference_points=reference_points, spatial_shapes=spatial_shapes,
            level_start_index=level_start_index, valid_ratios=valid_ratios,
            reg_branches=self.bbox_head.reg_branches if self.with_box_refine else None,
            moe_tokens=moe_tokens)
        return dict(hidden_states=inter_states,
                    references=[reference_points, *inter_references])


@MODELS.register_module()
class HIMoEDETR(HIMoEDetrMixin, DETR):
    """DETR with HI-MoE FFNs. Args: those of ``DETR`` plus ``moe``."""

    def __init__(self, *args, moe: ConfigType, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._build_moe(moe)

    def forward_encoder(self, feat: Tensor, feat_mask: Tensor, feat_pos: Tensor,
                        moe_tokens: TokenRouting) -> Dict:
        memory = self.encoder(query=feat, query_pos=feat_pos, key_padding_mask=feat_mask,
                              moe_tokens=moe_tokens)
        return dict(memory=memory)

    def forward_decoder(self, query: Tensor, query_pos: Tensor, memory: Tensor,
                        memory_mask: Tensor, memory_pos: Tensor,
                        moe_tokens: TokenRouting) -> Dict:
        hidden_states = self.decoder(query=query, key=memory, value=memory, query_pos=query_pos,
                                     key_pos=memory_pos, key_padding_mask=memory_mask,
                                     moe_tokens=moe_tokens)
        return dict(hidden_states=hidden_states)


def _deformable_encoder(detector, feat: Tensor, feat_mask: Tensor, feat_pos: Tensor,
                        spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                        moe_tokens: TokenRouting) -> Dict:
    """``DeformableDETR.forward_encoder`` with the token context passed to the layers."""
    memory = detector.encoder(query=feat, query_pos=feat_pos, key_padding_mask=feat_mask,
                              spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                              valid_ratios=valid_ratios, moe_tokens=moe_tokens)
    return dict(memory=memory, memory_mask=feat_mask, spatial_shapes=spatial_shapes)


def _layer_indices(value: Union[str, Sequence[int]], num_layers: int, key: str) -> List[int]:
    if value == 'all':
        return list(range(num_layers))
    if isinstance(value, (str, bool, int)) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise MoEConfigError(key, value, "must be 'all' or a list of layer indices")
    indices = sorted(set(value))
    if indices and (indices[0] < 0 or indices[-1] >= num_layers):
        raise MoEConfigError(key, value, f'layer indices must be in 0..{num_layers - 1}')
    return indices
