"""HI-MoE DETR-family detectors: chosen encoder/decoder FFNs become hierarchical MoE FFNs.

``HIMoEDINO``, ``HIMoEDeformableDETR`` and ``HIMoEDETR`` are the stock detectors plus one
``moe=dict(...)`` entry (parsed by ``detr_settings.parse_detr_moe_settings``). Every MoE FFN
(``detr_layers.MoEFFN``, which owns a core ``MoEBlock``) routes the tokens of a layer:

- encoder: the image tokens, padding excluded (it is neither routed nor pooled: padded tokens
  keep the residual only, and no real token ever attends to them);
- decoder: the object queries. DINO's denoising (DN) queries are routed and computed (the experts
  learn denoising) but never enter the scene descriptor, the balance losses or the statistics.

The scene descriptor of an image is, per MoE layer, the mean of its counted input tokens.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

import torch
from mmdet.models.detectors import DETR, DINO, DeformableDETR
from mmdet.registry import MODELS
from mmdet.structures import OptSampleList, SampleList
from mmdet.utils import ConfigType
from torch import Tensor, nn

from ..core import MoEConfigError, Routing
from .detr_layers import MOE_LAYERS, MoEFFN, TokenRouting, call_stock, check_ffn_cfg
from .detr_settings import MOE_KEY, DetrMoESettings, parse_detr_moe_settings
from .moe_settings import (build_router, build_routing_losses, log_routing_statistics,
                           routing_losses)

__all__ = ['HIMoEDETR', 'HIMoEDINO', 'HIMoEDeformableDETR', 'HIMoEDetrMixin', 'MoEFFN',
           'TokenRouting']


class HIMoEDetrMixin:
    """What a DETR-family detector needs for HI-MoE FFNs (mixed in before the stock class).

    ``moe`` settings (errors name ``moe.<key>``; see ``parse_detr_moe_settings``):

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

    def __init__(self, *args, moe: ConfigType, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._build_moe(moe)

    def _build_moe(self, moe: ConfigType) -> None:
        settings = parse_detr_moe_settings(moe, len(self.encoder.layers), len(self.decoder.layers))
        self.moe_stats_period = settings.stats_period
        built = build_routing_losses(MOE_KEY, settings.losses)
        self.moe_losses = nn.ModuleDict(
            {name: loss for name, loss in built.items() if loss is not None})
        for part, indices in settings.layers.items():
            coder = getattr(self, part)
            for index in indices:
                coder.layers[index] = self._moe_layer(coder, part, index, settings, built)

    def _moe_layer(self, coder: nn.Module, part: str, index: int, settings: DetrMoESettings,
                   losses: Dict) -> nn.Module:
        """The HI-MoE version of ``coder.layers[index]`` (same config, MoE FFN)."""
        stock = coder.layers[index]
        layer_type = MOE_LAYERS.get(type(stock))
        if layer_type is None:
            raise MoEConfigError(f'{MOE_KEY}.{part}_layers', index,
                                 f'{type(stock).__name__} is not supported; supported layers: '
                                 f'{sorted(t.__name__ for t in MOE_LAYERS)}')
        ffn_cfg = dict(coder.layer_cfg.get('ffn_cfg', {}))
        check_ffn_cfg(ffn_cfg, f'{part}.layer_cfg.ffn_cfg')
        embed_dims = stock.ffn.embed_dims
        hidden = stock.ffn.feedforward_channels
        router = build_router(MOE_KEY, settings.router, losses, settings.owner_settings,
                              scene_dim=embed_dims, instance_dim=embed_dims)
        layer = layer_type(**coder.layer_cfg)
        layer.ffn = MoEFFN(router, embed_dims,
                           settings.expert_channels_of(hidden, router.config.num_experts), hidden,
                           ffn_drop=float(ffn_cfg.get('ffn_drop', 0.0)),
                           dropout_layer=ffn_cfg.get('dropout_layer'),
                           add_identity=ffn_cfg.get('add_identity', True),
                           stats_scope=f'{part}.{index}', upcycle_mode=settings.upcycle_mode,
                           upcycle_noise_std=settings.upcycle_noise_std)
        return layer

    @property
    def moe_ffns(self) -> List[MoEFFN]:
        """The MoE FFNs, encoder first."""
        return [m for m in self.modules() if isinstance(m, MoEFFN)]

    def init_weights(self) -> None:
        """Stock init, then every MoE FFN's experts and router (``MoEFFN.reset_parameters``)."""
        super().init_weights()
        for ffn in self.moe_ffns:
            ffn.reset_parameters()

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

    def forward_encoder(self, moe_tokens: TokenRouting, **encoder_inputs) -> Dict:
        """The stock ``forward_encoder``, with ``moe_tokens`` passed to the encoder's layers."""
        encoder = functools.partial(self.encoder, moe_tokens=moe_tokens)
        return call_stock(super().forward_encoder.__func__, self, dict(encoder=encoder),
                          **encoder_inputs)

    def forward_decoder(self, moe_tokens: TokenRouting, **decoder_inputs) -> Dict:
        """The stock ``forward_decoder``, with ``moe_tokens`` passed to the decoder's layers."""
        decoder = functools.partial(self.decoder, moe_tokens=moe_tokens)
        return call_stock(super().forward_decoder.__func__, self, dict(decoder=decoder),
                          **decoder_inputs)

    def _pre_decoder(self, encoder_outputs: Dict, batch_data_samples: OptSampleList) -> Tuple:
        return self.pre_decoder(**encoder_outputs)


@MODELS.register_module()
class HIMoEDINO(HIMoEDetrMixin, DINO):
    """DINO with HI-MoE FFNs in the chosen encoder and decoder layers (the HI-MoE paper's
    setting). Args: those of ``DINO`` plus ``moe`` (see ``HIMoEDetrMixin``)."""

    def _pre_decoder(self, encoder_outputs: Dict, batch_data_samples: OptSampleList) -> Tuple:
        return self.pre_decoder(**encoder_outputs, batch_data_samples=batch_data_samples)


@MODELS.register_module()
class HIMoEDeformableDETR(HIMoEDetrMixin, DeformableDETR):
    """Deformable DETR with HI-MoE FFNs. Args: those of ``DeformableDETR`` plus ``moe``."""


@MODELS.register_module()
class HIMoEDETR(HIMoEDetrMixin, DETR):
    """DETR with HI-MoE FFNs. Args: those of ``DETR`` plus ``moe``."""
