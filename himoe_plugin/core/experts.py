"""Experts: E multi-layer perceptrons with stacked weights, run sparsely through a DispatchPlan."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_expert_backend
from .dispatch import DispatchPlan
from .export_dispatch import export_experts_forward, exporting
from .grouped_linear import grouped_linear


class StackedMLPExperts(nn.Module):
    """E independent MLPs ``dims[0] -> dims[1] -> ... -> dims[-1]``.

    ReLU follows every hidden layer, and the output layer too when ``activate_output`` (the
    fc layers of a box head) but not otherwise (a transformer FFN). ``hidden_dropout`` is
    applied (in training) after every hidden activation, as in a transformer FFN.

    Layer ``l`` of all experts is one parameter ``weight_l`` of shape (E, dims[l+1], dims[l])
    (nn.Linear layout per expert) and ``bias_l`` of shape (E, dims[l+1]). One parameter per
    layer means a data-parallel wrapper sees every expert as used as soon as any one is.

    ``expert_backend`` (``auto``, ``loop`` or ``grouped_mm``, see ``core/grouped_linear.py``)
    picks how the matmuls run; errors about it name ``expert_backend_key``.
    """

    def __init__(
        self,
        num_experts: int,
        dims: Sequence[int],
        activate_output: bool = True,
        hidden_dropout: float = 0.0,
        expert_backend: str = "auto",
        expert_backend_key: str = "expert_backend",
    ):
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"an expert needs at least input and output dims, got dims={list(dims)}")
        self.num_experts = num_experts
        self.dims = tuple(int(d) for d in dims)
        self.activate_output = activate_output
        self.hidden_dropout = hidden_dropout
        check_expert_backend(expert_backend, self.dims, expert_backend_key)
        self.expert_backend = expert_backend
        self.expert_backend_key = expert_backend_key
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, d_out, d_in))
            for d_in, d_out in zip(self.dims[:-1], self.dims[1:])
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, d_out)) for d_out in self.dims[1:]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every expert initialised independently like ``nn.Linear``."""
        for weight, bias in zip(self.weights, self.biases):
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(weight[e], a=math.sqrt(5))
            bound = 1.0 / math.sqrt(weight.shape[2])
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """(N, dims[0]) -> (N, dims[-1]): sum over kept assignments of weight * expert(x).

        Each layer is one grouped linear over the routed rows in expert order (every expert
        multiplies only its own rows: N*k rows in total, whatever E is); the first one gathers
        its rows itself. Every expert's parameters get a gradient (zero without rows), so DDP
        never sees an unused one. Under tracing or export: ``export_experts_forward``.
        """
        if exporting():
            return export_experts_forward(
                self.weights, self.biases, x, plan, self.activate_output, self.hidden_dropout, self.training
            )
        if x.shape[0] != plan.num_instances:
            raise ValueError(
                f"input has {x.shape[0]} rows but the dispatch plan routes {plan.num_instances}"
            )
        h = x
        row_index: Optional[torch.Tensor] = plan.instance_index
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = grouped_linear(
                h, weight, bias, plan.rows_per_expert, plan.expert_counts, row_index,
                relu=i < last or self.activate_output,
                backend=self.expert_backend, backend_key=self.expert_backend_key,
            )
            row_index = None
            if i < last and self.hidden_dropout > 0:
                h = F.dropout(h, self.hidden_dropout, self.training)
        return combine(h, plan)


def combine(expert_rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(A, D) expert outputs in expert order -> (N, D): ``sum_j w_j * row_j`` per instance.

    One autograd op: the rows are un-sorted into the (N, k) slot grid, scaled by their routing
    weight in place and summed over k (a copy, a scale and a reduction; a scatter-add is much
    slower on CPU). Slots of dropped assignments are 0.
    """
    return _Combine.apply(
        expert_rows, plan.combine_weight, plan.slot, plan.instance_index, plan.num_instances, plan.top_k
    )


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, slot, instance_index, num_instances: int, top_k: int):
        num_slots = num_instances * top_k
        dropless = rows.shape[0] == num_slots  # every slot written: no zero fill
        new = torch.empty if dropless else torch.zeros
        grid = new(num_slots, rows.shape[1], dtype=rows.dtype, device=rows.device)
        slot_weight = new(num_slots, dtype=rows.dtype, device=rows.device)
        grid.index_copy_(0, slot, rows)
        grid.mul_(slot_weight.index_copy_(0, slot, weight.to(rows.dtype)).unsqueeze(1))
        ctx.save_for_backward(rows, weight, instance_index)
        if top_k == 1:
            return grid
        return grid.view(num_instances, top_k, rows.shape[1]).sum(dim=1)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, instance_index = ctx.saved_tensors
        grad_rows = grad.index_select(0, instance_index)  # (A, D), the grad of every kept slot
        grad_weight = torch.linalg.vecdot(grad_rows, rows).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_rows.mul_(weight.to(grad_rows.dtype).unsqueeze(1))
        return grad_rows, grad_weight, None, None, None, None


class DenseMLP(nn.Module):
    """One always-on MLP (the shared expert), same layout as one of ``StackedMLPExperts``."""

    def __init__(self, dims: Sequence[int], activate_output: bool = True, hidden_dropout: float = 0.0):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.activate_output = activate_output
        self.hidden_dropout = hidden_dropout
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.dims[:-1], self.dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dims[0]) -> (N, dims[-1])."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.activate_output:
                x = F.relu(x)
            if i < last and self.hidden_dropout > 0:
                x = F.dropout(x, self.hidden_dropout, self.training)
        return x


class MoEMLP(nn.Module):
    """Routed experts plus an optional always-on shared expert (ViMoE).

    ``y = (1 - s) * sum_j w_j * expert_j(x) + s * shared(x)`` with ``s = shared_expert_weight``
    when the shared expert is on, else ``y = sum_j w_j * expert_j(x)``. With identical experts
    (and a shared expert equal to them) and weights summing to 1, ``y`` equals one dense MLP.
    The shared expert has the experts' widths unless ``shared_dims`` says otherwise (e.g. the
    whole dense FFN next to fine-grained experts).
    """

    def __init__(
        self,
        num_experts: int,
        dims: Sequence[int],
        shared_expert: bool = False,
        shared_expert_weight: float = 0.5,
        activate_output: bool = True,
        num_experts_key: str = "num_experts",
        shared_dims: Optional[Sequence[int]] = None,
        hidden_dropout: float = 0.0,
        expert_backend: str = "auto",
        expert_backend_key: str = "expert_backend",
    ):
        super().__init__()
        self.experts = StackedMLPExperts(
            num_experts, dims, activate_output, hidden_dropout, expert_backend, expert_backend_key
        )
        self.shared: Optional[DenseMLP] = None
        if shared_expert:
            self.shared = DenseMLP(shared_dims or dims, activate_output, hidden_dropout)
        self.shared_expert_weight = shared_expert_weight
        self.num_experts_key = num_experts_key
        # Saved with checkpoints so that loading one with another expert count fails clearly
        # (checkpointers that skip shape-mismatched tensors would otherwise only warn).
        self.register_buffer("num_experts", torch.tensor(num_experts), persistent=True)
        # Likewise the widths [in, hidden..., out] (the guard of ``MoEBlock`` names the setting).
        self.register_buffer("expert_dims", torch.tensor(self.dims), persistent=True)

    @property
    def dims(self) -> Tuple[int, ...]:
        return self.experts.dims

    def forward(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """(N, dims[0]) -> (N, dims[-1])."""
        routed = self.experts(x, plan)
        if self.shared is None:
            return routed
        s = self.shared_expert_weight
        return (1.0 - s) * routed + s * self.shared(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        key = prefix + "num_experts"
        if key in state_dict:
            saved = int(state_dict[key])
            if saved != self.experts.num_experts:
                raise ValueError(
                    f"{self.num_experts_key}: the checkpoint has {saved} experts at "
                    f"'{prefix[:-1]}' but the model is built with {self.experts.num_experts}. "
                    f"Set {self.num_experts_key}={saved} to load it, or start from a dense "
                    "checkpoint to upcycle."
                )
        # Checkpoints written before the record existed (or upcycled from dense layers, checked
        # against the experts' shapes) hold none: the model's own.
        state_dict.setdefault(prefix + "expert_dims", self.expert_dims.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


