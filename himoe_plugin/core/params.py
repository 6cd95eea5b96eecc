"""Parameter counts of models with HI-MoE layers: total, and active (used by one instance)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .block import MoEBlock


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model.

    Attributes:
        total: every parameter.
        active: the parameters one instance (RoI) runs through: everything except, in each
            MoE layer, the ``E - top_k`` routed experts it is not sent to.
        experts: the parameters of all routed experts (included in ``total``).
    """

    total: int
    active: int
    experts: int


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and active parameters of ``model``; every ``MoEBlock`` is one MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    experts = inactive = 0
    for block in model.modules():
        if not isinstance(block, MoEBlock):
            continue
        num_experts = block.config.num_experts
        per_expert = sum(p.numel() for p in block.moe.experts.parameters()) // num_experts
        experts += per_expert * num_experts
        inactive += per_expert * (num_experts - block.config.top_k)
    return ParameterCount(total=total, active=total - inactive, experts=experts)
