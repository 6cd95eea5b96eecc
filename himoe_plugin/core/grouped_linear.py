"""Grouped linear layer: E linear maps, each applied to its own contiguous block of rows.

One autograd node for all experts: the forward writes every expert's output into one buffer and
the backward writes every expert's weight gradient straight into one (E, out, in) tensor (zeros
for experts without rows). Indexing a stacked weight per expert would instead make autograd
materialise and stack E separate gradients: an extra copy of all expert weights per step.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F


def autocast_dtype(device_type: str):
    """The autocast compute dtype active for ``device_type``, or None (torch >= 2.0)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device kind
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rows_per_expert: Sequence[int]
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e].T + bias[e]`` for every expert e.

    Args:
        x: (A, in), rows grouped by expert in expert order.
        weight: (E, out, in). bias: (E, out).
        rows_per_expert: E ints summing to A.
    Returns:
        (A, out). Under autocast the matmuls run in the autocast dtype, like ``F.linear``.

    While tracing (TorchScript export, fvcore / mmengine FLOP counters) it is written as one
    ``F.linear`` per expert, so tracers see standard ops with the real row counts.
    """
    if torch.jit.is_tracing():
        chunks = torch.split(x, list(rows_per_expert))
        return torch.cat([F.linear(rows, weight[e], bias[e]) for e, rows in enumerate(chunks)])
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _GroupedLinear.apply(x, weight, bias, list(rows_per_expert))


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows_per_expert: List[int]):
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, rows in enumerate(rows_per_expert):
            if rows:
                end = start + rows
                torch.addmm(bias[e], x[start:end], weight[e].t(), out=out[start:end])
                start = end
        ctx.save_for_backward(x, weight)
        ctx.rows_per_expert = rows_per_expert
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = weight.new_empty(weight.shape[:2]) if need_b else None
        start = 0
        for e, rows in enumerate(ctx.rows_per_expert):
            end = start + rows
            g = grad_out[start:end]
            if need_x and rows:
                torch.mm(g, weight[e], out=grad_x[start:end])
            if need_w:
                torch.mm(g.t(), x[start:end], out=grad_w[e])  # zeros when the expert had no rows
            if need_b:
                torch.sum(g, dim=0, out=grad_b[e])
            start = end
        return grad_x, grad_w, grad_b, None
