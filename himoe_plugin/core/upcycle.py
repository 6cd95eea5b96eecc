"""Sparse upcycling: turn the dense layers of a checkpoint into the experts of a MoEMLP.

Two modes:

- ``copy``: every expert (and the shared expert) is the dense MLP (optionally plus noise), so
  with routing weights summing to 1 the block equals the dense MLP exactly at any top-k.
- ``split`` (fine-grained, two-layer MLPs without output activation, e.g. a transformer FFN):
  expert e holds the hidden units ``[e*h, (e+1)*h)`` of the dense MLP (``h = hidden / E``); its
  output layer is scaled by E and keeps the dense output bias, so a single expert has the dense
  output scale, every top-k mixture (weights summing to 1) too, and the mean of all E experts
  (all experts on, uniform weights 1/E) is the dense MLP exactly. Active compute at top-k is
  k/E of the dense MLP. A shared expert, if any, is the whole dense MLP.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .experts import MoEMLP

UPCYCLE_MODES = ("copy", "split")

Layer = Tuple[torch.Tensor, torch.Tensor]


def stack_dense_layers(
    layers: Sequence[Layer], num_experts: int, dims: Sequence[int], noise_std: float = 0.0
) -> List[Layer]:
    """E copies of dense layers: ``[(weight (E, out, in), bias (E, out)), ...]``.

    ``noise_std`` > 0 adds Gaussian noise scaled by each layer's weight std, so that experts
    can diverge; 0 gives identical experts. Raises ValueError if the layers do not chain
    ``dims[0] -> ... -> dims[-1]``.
    """
    _check_shapes(layers, [(d_out, d_in) for d_in, d_out in zip(dims[:-1], dims[1:])])
    stacked = []
    for weight, bias in layers:
        weight = weight.detach().float()
        experts_w = weight.unsqueeze(0).repeat(num_experts, 1, 1)
        if noise_std > 0:
            experts_w += torch.randn_like(experts_w) * noise_std * weight.std()
        stacked.append((experts_w, bias.detach().float().unsqueeze(0).repeat(num_experts, 1)))
    return stacked


def split_dense_layers(
    layers: Sequence[Layer], num_experts: int, dims: Sequence[int], noise_std: float = 0.0
) -> List[Layer]:
    """Fine-grained split of a two-layer MLP ``in -> hidden -> out`` into E experts of
    ``in -> hidden / E -> out`` (see the module docstring for the scaling)."""
    if len(layers) != 2 or len(dims) != 3:
        raise ValueError(
            f"split upcycling needs a two-layer MLP and two-layer experts, got {len(layers)} "
            f"dense layers and experts of dims {list(dims)}"
        )
    d_in, h, d_out = dims
    _check_shapes(layers, [(h * num_experts, d_in), (d_out, h * num_experts)])
    (w1, b1), (w2, b2) = [(w.detach().float(), b.detach().float()) for w, b in layers]
    experts_w1 = w1.reshape(num_experts, h, d_in).clone()
    experts_b1 = b1.reshape(num_experts, h).clone()
    experts_w2 = (w2.reshape(d_out, num_experts, h).permute(1, 0, 2) * num_experts).contiguous()
    experts_b2 = b2.unsqueeze(0).repeat(num_experts, 1)
    if noise_std > 0:
        experts_w1 += torch.randn_like(experts_w1) * noise_std * w1.std()
        experts_w2 += torch.randn_like(experts_w2) * noise_std * experts_w2.std()
    return [(experts_w1, experts_b1), (experts_w2, experts_b2)]


def upcycle_state_dict(
    state_dict: Dict[str, torch.Tensor],
    dense_prefixes: Sequence[str],
    moe_prefix: str,
    moe: MoEMLP,
    mode: str = "copy",
    noise_std: float = 0.0,
) -> List[str]:
    """Rewrite, in place, dense layer entries of ``state_dict`` into expert entries.

    Called from a module's ``_load_from_state_dict`` (so it works with every checkpointer that
    ends in ``Module.load_state_dict``). Does nothing, and returns ``[]``, unless the state
    holds ``<p>.weight`` and ``<p>.bias`` for every ``p`` in ``dense_prefixes`` and holds no
    expert weights under ``moe_prefix`` (e.g. ``'roi_heads.box_head.moe_block.moe.'``).

    Returns the report (the adapters log it): one line per mapped key. The dense keys are
    removed so they are not reported as unexpected; routers are not touched (they keep their
    near-neutral init). Raises ValueError if the dense layers do not fit the experts.
    """
    if mode not in UPCYCLE_MODES:
        raise ValueError(f"upcycle mode {mode!r}: expected one of {UPCYCLE_MODES}")
    if any(key.startswith(moe_prefix + "experts.") for key in state_dict):
        return []
    dense_keys = [(f"{p}.weight", f"{p}.bias") for p in dense_prefixes]
    if not all(w in state_dict and b in state_dict for w, b in dense_keys):
        return []
    layers = [(torch.as_tensor(state_dict[w]), torch.as_tensor(state_dict[b])) for w, b in dense_keys]
    num_experts = moe.experts.num_experts
    build = split_dense_layers if mode == "split" else stack_dense_layers
    if mode == "split" and moe.experts.activate_output:
        raise ValueError("split upcycling needs experts without output activation (a transformer FFN)")
    try:
        stacked = build(layers, num_experts, moe.dims, noise_std)
    except ValueError as err:
        raise ValueError(f"cannot upcycle '{moe_prefix[:-1]}' from the dense checkpoint: {err}") from None

    what = "slices of the hidden units" if mode == "split" else "copies"
    report = []
    for layer, ((w, b), (experts_w, experts_b)) in enumerate(zip(dense_keys, stacked)):
        state_dict[f"{moe_prefix}experts.weights.{layer}"] = experts_w
        state_dict[f"{moe_prefix}experts.biases.{layer}"] = experts_b
        report.append(f"{w}, {b} -> {moe_prefix}experts.*.{layer} ({num_experts} {what})")
        if moe.shared is not None:  # the whole dense layer, also next to split experts
            state_dict[f"{moe_prefix}shared.layers.{layer}.weight"] = layers[layer][0].detach().float().clone()
            state_dict[f"{moe_prefix}shared.layers.{layer}.bias"] = layers[layer][1].detach().float().clone()
            report.append(f"{w}, {b} -> {moe_prefix}shared.layers.{layer} (shared expert)")
        del state_dict[w], state_dict[b]
    state_dict[moe_prefix + "num_experts"] = torch.tensor(num_experts)
    return report


def _check_shapes(layers: Sequence[Layer], expected: Sequence[Tuple[int, int]]) -> None:
    shapes = [tuple(w.shape) for w, _ in layers]
    if shapes != list(expected) or any(tuple(b.shape) != (w.shape[0],) for w, b in layers):
        raise ValueError(f"dense layers of shapes {shapes} do not fit experts of shapes {list(expected)}")
