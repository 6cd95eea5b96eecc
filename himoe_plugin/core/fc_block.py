"""The expert block of a box head: a contiguous run of its fc layers becomes routed experts.

Both frameworks' MoE box heads are thin shells over this: they build their convs and the dense
fc layers that stay (under their stock names, so dense checkpoints load), and this module
decides the split, builds the ``MoEBlock``, initialises the experts, runs the fc part and
upcycles dense checkpoints on load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .block import MoEBlock
from .config import check_contiguous_layers, check_int
from .router import HierarchicalRouter
from .routing import Routing, SceneRouting


@dataclass(frozen=True)
class FCBlockLayout:
    """How a box head's fc layers split around the expert block.

    Attributes:
        input_dim: width of the flattened RoI feature (C * H * W after the convs).
        pooled_channels: C, the RoI feature's channels.
        fc_dims: output width of every fc layer.
        moe_fc_layers: the contiguous 0-based fc layers that become experts.
        expert_dim: hidden width inside a multi-layer expert (0: the fc layers' widths).
    """

    input_dim: int
    pooled_channels: int
    fc_dims: Tuple[int, ...]
    moe_fc_layers: Tuple[int, ...]
    expert_dim: int = 0

    @classmethod
    def checked(cls, input_dim: int, pooled_channels: int, fc_dims: Sequence[int],
                moe_fc_layers: Sequence[int], expert_dim: int, keys: Mapping[str, str]) -> "FCBlockLayout":
        """The layout, with ``moe_fc_layers`` and ``expert_dim`` validated (errors name
        ``keys[name]``)."""
        layers = list(moe_fc_layers)
        check_contiguous_layers(layers, len(fc_dims), keys.get("moe_fc_layers", "moe_fc_layers"))
        check_int(expert_dim, keys.get("expert_dim", "expert_dim"), 0)
        return cls(input_dim, pooled_channels, tuple(fc_dims), tuple(int(i) for i in layers), expert_dim)

    def fc_input(self, index: int) -> int:
        """Input width of fc layer ``index``."""
        return self.fc_dims[index - 1] if index > 0 else self.input_dim

    @property
    def before(self) -> range:
        """The dense fc layers before the experts."""
        return range(self.moe_fc_layers[0])

    @property
    def after(self) -> range:
        """The dense fc layers after the experts."""
        return range(self.moe_fc_layers[-1] + 1, len(self.fc_dims))

    @property
    def routes_on_pooled_roi(self) -> bool:
        """Experts starting at the first fc layer would route on the flattened C*H*W RoI feature;
        the (much cheaper) spatial mean of the RoI feature carries the same channels."""
        return self.moe_fc_layers[0] == 0

    @property
    def router_input_dim(self) -> int:
        """Width of what the instance router sees: the pooled RoI feature, else the block input."""
        return self.pooled_channels if self.routes_on_pooled_roi else self.fc_input(self.moe_fc_layers[0])

    @property
    def expert_dims(self) -> List[int]:
        """``[in, hidden..., out]`` of every expert."""
        first, last = self.moe_fc_layers[0], self.moe_fc_layers[-1]
        hidden = [self.expert_dim or d for d in self.fc_dims[first:last]]
        return [self.fc_input(first), *hidden, self.fc_dims[last]]


def build_fc_experts(layout: FCBlockLayout, router: HierarchicalRouter) -> MoEBlock:
    """The ``MoEBlock`` of ``layout`` with ``router`` (whose instance router sees
    ``layout.router_input_dim`` channels); ReLU after the experts, as after any box-head fc."""
    return MoEBlock(router, layout.expert_dims, activate_output=True)


def init_fc_experts(block: MoEBlock, init_weight: Callable[[torch.Tensor], None]) -> None:
    """Initialise every expert's (and the shared expert's) layers like the dense fc layers:
    ``init_weight`` on each expert's weight (out, in), zero biases."""
    moe = block.moe
    for weight, bias in zip(moe.experts.weights, moe.experts.biases):
        for expert_weight in weight.data:
            init_weight(expert_weight)
        nn.init.zeros_(bias)
    if moe.shared is not None:
        for layer in moe.shared.layers:
            init_weight(layer.weight.data)
            nn.init.zeros_(layer.bias)


def run_fc_block(
    x: torch.Tensor,
    fcs_before: Sequence[nn.Module],
    block: MoEBlock,
    fcs_after: Sequence[nn.Module],
    scene_features: Optional[torch.Tensor],
    image_index: torch.Tensor,
    scene_targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    scene: Optional[SceneRouting] = None,
    routing: Optional[Routing] = None,
) -> Tuple[torch.Tensor, Routing]:
    """The fc part of a box head: dense fcs, the expert block, dense fcs (ReLU after each).

    Args:
        x: (N, C, H, W) RoI features after the head's convs.
        fcs_before / fcs_after: the dense fc layers around the expert block.
        scene_features, image_index, scene_targets, scene, routing: as ``MoEBlock.forward``.
    Returns:
        (N, fc_dims[-1]) box features and the ``Routing``.
    """
    router_input = x.mean(dim=(2, 3)) if not fcs_before else None
    x = torch.flatten(x, start_dim=1)
    for fc in fcs_before:
        x = F.relu(fc(x))
    x, routing = block(
        x, scene_features, image_index, router_input=router_input, scene_targets=scene_targets,
        scene=scene, routing=routing,
    )
    for fc in fcs_after:
        x = F.relu(fc(x))
    return x, routing


def load_fc_block(block: MoEBlock, state_dict: Dict[str, torch.Tensor], head_prefix: str,
                  block_name: str, dense_prefixes: Sequence[str], noise_std: float) -> List[str]:
    """Prepare ``state_dict`` for the head at ``head_prefix`` before it loads: checkpoints written
    before the block existed (``router.*``, ``moe.*`` under the head) move under ``block_name``,
    and a dense checkpoint's fc layers ``dense_prefixes`` (full key prefixes) become the experts.
    Returns the upcycling report (empty if nothing was upcycled)."""
    MoEBlock.adopt_flat_keys(state_dict, head_prefix, block_name)
    return block.upcycle(state_dict, f"{head_prefix}{block_name}.", dense_prefixes, noise_std=noise_std)
