"""Record, during a model's forward, every MoE layer's ``Routing`` together with the boxes its
instances were pooled from (forward hooks; the model runs unchanged)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from ..core import MoEBlock, Routing
from .report import LayerInfo


def moe_layers(model: nn.Module) -> Dict[str, MoEBlock]:
    """The model's MoE blocks by analysis name: the block's ``stats_scope``, else the module
    path of its owner (e.g. ``roi_heads.box_head`` for ``roi_heads.box_head.moe_block``)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, MoEBlock):
            owner = name.rsplit(".", 1)[0] if name.endswith(".moe_block") else name
            layers[module.stats_scope or owner] = module
    return layers


class NoMoELayersError(ValueError):
    """The model has no HI-MoE layer: there is no routing to analyse or draw."""


def require_moe_layers(model: nn.Module, config: str) -> Dict[str, MoEBlock]:
    """``moe_layers(model)``; ``NoMoELayersError`` naming ``config`` (the config the model was
    built from) if there are none, e.g. a dense Faster R-CNN or DINO."""
    layers = moe_layers(model)
    if not layers:
        raise NoMoELayersError(
            f"{config} builds a dense {type(model).__name__} without HI-MoE layers: routing analysis and "
            "routing pictures need an HI-MoE config (and its checkpoint)")
    return layers


def layer_infos(model: nn.Module) -> Dict[str, LayerInfo]:
    """``LayerInfo`` (experts, scene groups) of every MoE layer of ``model``."""
    return {name: LayerInfo(block.config.num_experts, block.config.groups) for name, block in moe_layers(model).items()}


class RoutingCapture:
    """Context manager that hooks the model's MoE blocks and its box sources.

    ``box_sources`` maps a module (e.g. the RoI pooler) to a function of its forward inputs that
    returns what the adapter needs to place the instances (boxes, levels). Every MoE-block call
    is paired with the latest box-source call before it: ``pairs`` is the list of
    ``(layer, routing, boxes)`` of one forward (cascade stages give one pair per stage).
    """

    def __init__(self, model: nn.Module, box_sources: Dict[nn.Module, Callable[[Tuple[Any, ...]], Any]]):
        self.layers = moe_layers(model)
        self.box_sources = box_sources
        self.pairs: List[Tuple[str, Routing, Any]] = []
        self._boxes: Optional[Any] = None
        self._handles: List[Any] = []

    def __enter__(self) -> "RoutingCapture":
        for source, read in self.box_sources.items():
            self._handles.append(source.register_forward_pre_hook(self._source_hook(read)))
        for name, block in self.layers.items():
            self._handles.append(block.register_forward_hook(self._block_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        self.pairs, self._boxes = [], None

    def _source_hook(self, read):
        def hook(module, args):
            self._boxes = read(args)

        return hook

    def _block_hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, tuple):  # an MoEBlock returns (outputs, Routing)
                self.pairs.append((name, output[1], self._boxes))

        return hook
