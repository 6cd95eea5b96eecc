"""Sparse dispatch: group routed (instance, expert) assignments by expert, with optional capacity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .export_dispatch import exporting, export_dispatch_plan


@dataclass
class DispatchPlan:
    """Which instance rows every expert processes, in expert order.

    ``A`` is the number of assignments run (``N * k`` minus those the capacity limit dropped).

    Attributes:
        num_instances: N, rows of the input.
        instance_index: (A,) long, input row of each assignment run, grouped by expert.
        slot: (A,) long, ``row * k + choice`` of each assignment run: where its weighted
            output goes in the (N, k) grid that is summed over k to combine.
        combine_weight: (A,) float32, the routing weight each assignment run is scaled by.
        rows_per_expert: length-E list of ints, how many assignments each expert runs
            (a host list: splitting by it is the one host sync of the dispatch).
        expert_counts: (E,) long, ``rows_per_expert`` on the device (for grouped GEMMs).
        within_capacity: (N, k) bool, which of the routed assignments the capacity limit let run.
        num_dropped: how many assignments the capacity limit dropped (a host int).
    """

    num_instances: int
    top_k: int
    instance_index: torch.Tensor
    slot: torch.Tensor
    combine_weight: torch.Tensor
    rows_per_expert: List[int]
    expert_counts: torch.Tensor
    within_capacity: torch.Tensor
    num_dropped: int = 0

    @property
    def num_experts(self) -> int:
        return len(self.rows_per_expert)


def build_dispatch_plan(
    expert_index: torch.Tensor,
    combine_weight: torch.Tensor,
    confidence: torch.Tensor,
    num_experts: int,
    capacity: int = 0,
) -> DispatchPlan:
    """Sort the assignments of ``expert_index`` (N, k) by expert.

    Args:
        expert_index: (N, k) long, expert of each assignment.
        combine_weight: (N, k) float, weight applied to each expert output.
        confidence: (N, k) float, router probability of each assignment; when ``capacity`` > 0
            an expert keeps its ``capacity`` most confident assignments and drops the rest.
        capacity: maximum assignments per expert; 0 means dropless.
    Under tracing or export: an ``ExportDispatchPlan`` (no host-side sizes, dropless).
    """
    if exporting():
        return export_dispatch_plan(expert_index, combine_weight, num_experts)
    num_instances, top_k = expert_index.shape
    device = expert_index.device
    flat_expert = expert_index.reshape(-1)
    if capacity > 0:
        # Most confident first, then (stably) by expert: rank within an expert = drop priority.
        by_confidence = torch.argsort(confidence.reshape(-1), descending=True, stable=True)
        order = by_confidence[torch.argsort(flat_expert[by_confidence], stable=True)]
        sorted_expert = flat_expert[order]
        per_expert = torch.bincount(sorted_expert, minlength=num_experts)
        first_of_expert = torch.cumsum(per_expert, 0) - per_expert
        rank_in_expert = torch.arange(order.numel(), device=device) - first_of_expert[sorted_expert]
        keep_sorted = rank_in_expert < capacity
        within_capacity = torch.zeros_like(flat_expert, dtype=torch.bool)
        within_capacity[order[keep_sorted]] = True
        order = order[keep_sorted]
        expert_counts = per_expert.clamp_max(capacity)
    else:
        order = torch.argsort(flat_expert, stable=True)
        within_capacity = torch.ones_like(flat_expert, dtype=torch.bool)
        expert_counts = torch.bincount(flat_expert, minlength=num_experts)
    rows_per_expert = expert_counts.tolist()
    return DispatchPlan(
        num_instances=num_instances,
        top_k=top_k,
        instance_index=torch.div(order, top_k, rounding_mode="floor"),
        slot=order,
        combine_weight=combine_weight.reshape(-1)[order],
        rows_per_expert=rows_per_expert,
        expert_counts=expert_counts,
        within_capacity=within_capacity.view(num_instances, top_k),
        num_dropped=num_instances * top_k - sum(rows_per_expert),
    )
