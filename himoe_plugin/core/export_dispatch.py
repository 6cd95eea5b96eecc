"""Export formulation of an HI-MoE layer: dispatch, experts and combine with no host-side sizes.

The eager sparse path sorts the routed assignments by expert and splits them by the per-expert
row counts, read on the host. A tracer (``torch.jit.trace``, ``torch.onnx.export``,
``torch.export``) would freeze those counts into the graph as constants, and the exported model
would fail (or silently drop experts) on every input whose routing differs from the sample's.

While a model is being traced or exported (``exporting()``) the core therefore switches to a
formulation whose sizes all live in tensors:

- the dispatch plan is the routing itself (``ExportDispatchPlan``: expert index and combine
  weight of every instance, no sort, no counts, no capacity: exports are dropless);
- the experts are a fixed loop over the E experts in which expert e selects its own rows
  (``nonzero`` of ``expert_index == e``), runs its layers on them only (``index_select`` +
  ``F.linear``) and adds their weighted output into the result (``index_add``): N*k rows are
  computed in total whatever E is, as in eager, and every expert is in the graph;
- routing losses and statistics are not computed (they are training-time quantities);
- the scene descriptor masks the padded area with tensors built from the image sizes instead of
  slicing by Python ints.

Eager and exported outputs agree to float rounding (the combine sums the same products in
expert order instead of choice order). FLOP counters that trace (fvcore, Detectron2's
``analyze_model.py``) see one ``F.linear`` per expert on the rows it really got.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F


def exporting() -> bool:
    """Whether the running forward is being recorded by ``torch.jit.trace`` (also fvcore's FLOP
    counter and the TorchScript-based ``torch.onnx.export``), ``torch.onnx.export`` or
    ``torch.export`` (the dynamo ONNX exporter)."""
    return bool(
        torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
    )


@dataclass
class ExportDispatchPlan:
    """The dispatch plan of an exported layer: the routing itself, nothing read on the host.

    Attributes:
        expert_index: (N, k) long, experts of every instance.
        combine_weight: (N, k) float, their routing weights.
        within_capacity: (N, k) bool, all True (exports are dropless).
        num_experts: E.
    """

    expert_index: torch.Tensor
    combine_weight: torch.Tensor
    within_capacity: torch.Tensor
    num_experts: int
    num_dropped: int = 0


def export_dispatch_plan(
    expert_index: torch.Tensor, combine_weight: torch.Tensor, num_experts: int
) -> ExportDispatchPlan:
    """The plan of ``build_dispatch_plan`` under export: (N, k) expert index and combine weight,
    dropless (a capacity limit would need per-expert counts on the host)."""
    return ExportDispatchPlan(
        expert_index=expert_index,
        combine_weight=combine_weight,
        within_capacity=torch.ones_like(expert_index, dtype=torch.bool),
        num_experts=num_experts,
    )


def export_experts_forward(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    plan: ExportDispatchPlan,
    activate_output: bool,
    hidden_dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """(N, dims[0]) -> (N, dims[-1]): ``sum_j w_j * expert_j(x)`` with a fixed loop over experts.

    Args:
        weights / biases: per layer, (E, out, in) and (E, out), all experts stacked.
        x: (N, dims[0]) instances.
        plan: their routing (``ExportDispatchPlan``).
        activate_output: ReLU after the last layer too.
        hidden_dropout / training: dropout after hidden activations (training only).
    Every expert computes only the rows routed to it: sizes come from ``nonzero`` on tensors.
    """
    last = len(weights) - 1
    out = x.new_zeros(x.shape[0], weights[last].shape[1])
    for e in range(plan.num_experts):
        chosen = plan.expert_index == e  # (N, k): top-k experts are distinct, at most one per row
        rows = torch.nonzero(chosen.any(dim=1)).squeeze(1)
        h = x.index_select(0, rows)
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            h = F.linear(h, weight[e], bias[e])
            if i < last or activate_output:
                h = F.relu(h)
            if i < last and hidden_dropout > 0:
                h = F.dropout(h, hidden_dropout, training)
        weight_of_row = (plan.combine_weight * chosen).sum(dim=1).index_select(0, rows)
        out = out.index_add(0, rows, h * weight_of_row.to(h.dtype).unsqueeze(1))
    return out


def image_index_of(per_image: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) long, the image of every instance, from each image's (n_i, ...) instance tensor.

    Built from the tensors (``full_like``), not from Python lengths, so that a traced model
    takes any number of instances per image."""
    return torch.cat([torch.full_like(t[:, 0], i, dtype=torch.long) for i, t in enumerate(per_image)])


def export_masked_mean_pool(
    feature_maps: Sequence[torch.Tensor],
    strides: Sequence[int],
    image_sizes: Sequence[Union[torch.Tensor, Tuple[int, int]]],
) -> torch.Tensor:
    """``masked_mean_pool`` under export: the valid area of every image is a mask built from
    its size (a (2,) tensor while Detectron2 traces, or ints), not a slice by Python ints.

    Returns (B, C) float32, each image's features averaged over its unpadded area, then levels.
    """
    sizes = torch.stack([_size_tensor(size) for size in image_sizes]).to(feature_maps[0].device)
    per_level = []
    for features, stride in zip(feature_maps, strides):
        height, width = features.shape[-2:]
        valid = torch.ceil(sizes.to(torch.float32) / stride).clamp_min(1.0)  # (B, 2)
        rows = torch.arange(height, device=features.device).unsqueeze(0) < valid[:, :1]  # (B, H)
        cols = torch.arange(width, device=features.device).unsqueeze(0) < valid[:, 1:]  # (B, W)
        mask = (rows.unsqueeze(2) & cols.unsqueeze(1)).to(torch.float32)  # (B, H, W)
        total = (features.to(torch.float32) * mask.unsqueeze(1)).sum(dim=(2, 3))
        per_level.append(total / mask.sum(dim=(1, 2)).unsqueeze(1))
    return torch.stack(per_level).mean(dim=0)


def _size_tensor(size: Union[torch.Tensor, Tuple[int, int]]) -> torch.Tensor:
    if isinstance(size, torch.Tensor):
        return size.reshape(2)
    return torch.stack([torch.as_tensor(v) for v in size])
