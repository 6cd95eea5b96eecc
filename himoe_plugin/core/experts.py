"""Experts: E multi-layer perceptrons with stacked weights, run sparsely through a DispatchPlan."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import DispatchPlan
from .grouped_linear import grouped_linear


class StackedMLPExperts(nn.Module):
    """E independent MLPs ``dims[0] -> dims[1] -> ... -> dims[-1]``.

    ReLU follows every hidden layer, and the output layer too when ``activate_output`` (the
    fc layers of a box head) but not otherwise (a transformer FFN). ``hidden_dropout`` is
    applied (in training) after every hidden activation, as in a transformer FFN.

    Layer ``l`` of all experts is one parameter ``weight_l`` of shape (E, dims[l+1], dims[l])
    (nn.Linear layout per expert) and ``bias_l`` of shape (E, dims[l+1]). One parameter per
    layer means a data-parallel wrapper sees every expert as used as soon as any one is.
    """

    def __init__(
        self,
        num_experts: int,
        dims: Sequence[int],
        activate_output: bool = True,
        hidden_dropout: float = 0.0,
    ):
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"an expert needs at least input and output dims, got dims={list(dims)}")
        self.num_experts = num_experts
        self.dims = tuple(int(d) for d in dims)
        self.activate_output = activate_output
        self.hidden_dropout = hidden_dropout
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

        The routed rows are gathered in expert order and each layer is one grouped linear
        (every expert multiplies only its own rows: N*k rows in total, whatever E is). Every
        expert's parameters get a gradient (zero without rows), so DDP never sees an unused one.
        """
        if x.shape[0] != plan.num_instances:
            raise ValueError(
                f"input has {x.shape[0]} rows but the dispatch plan routes {plan.num_instances}"
            )
        h = x.index_select(0, plan.instance_index)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = grouped_linear(h, weight, bias, plan.rows_per_expert)
            if i < last or self.activate_output:
                h = F.relu(h)
            if i < last and self.hidden_dropout > 0:
                h = F.dropout(h, self.hidden_dropout, self.training)
        weighted = h * plan.combine_weight.unsqueeze(1).to(h.dtype)
        # Un-sort into the (N, k) grid (dropped assignments stay 0) and sum over k: a copy and a
        # reduction, much cheaper than a scatter-add on CPU.
        grid = weighted.new_zeros(plan.num_instances * plan.top_k, self.dims[-1])
        grid = grid.index_copy(0, plan.slot, weighted)
        return grid.view(plan.num_instances, plan.top_k, self.dims[-1]).sum(dim=1)



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
    ):
        super().__init__()
        self.experts = StackedMLPExperts(num_experts, dims, activate_output, hidden_dropout)
        self.shared: Optional[DenseMLP] = None
        if shared_expert:
            self.shared = DenseMLP(shared_dims or dims, activate_output, hidden_dropout)
        self.shared_expert_weight = shared_expert_weight
        self.num_experts_key = num_experts_key
        # Saved with checkpoints so that loading one with another expert count fails clearly
        # (checkpointers that skip shape-mismatched tensors would otherwise only warn).
        self.register_buffer("num_experts", torch.tensor(num_experts), persistent=True)

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
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


