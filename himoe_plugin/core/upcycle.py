"""Sparse upcycling: turn the dense layers of a checkpoint into the experts of a MoEMLP."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .experts import MoEMLP, stack_dense_layers


def upcycle_state_dict(
    state_dict: Dict[str, torch.Tensor],
    prefix: str,
    dense_layer_names: Sequence[str],
    moe_name: str,
    moe: MoEMLP,
    noise_std: float = 0.0,
) -> List[str]:
    """Rewrite, in place, dense layer entries of ``state_dict`` into expert entries.

    Called from a head's ``_load_from_state_dict`` (so it works with every checkpointer that
    ends in ``Module.load_state_dict``). Does nothing, and returns ``[]``, unless the state
    holds the dense layers ``prefix + name + '.weight'/'.bias'`` for every name in
    ``dense_layer_names`` and holds no expert weights under ``prefix + moe_name``.

    Returns the report (the adapters log it): one line per mapped key. The dense keys are removed so they are not
    reported as unexpected; routers are not touched (they keep their near-neutral init).
    """
    moe_prefix = f"{prefix}{moe_name}."
    if any(key.startswith(moe_prefix + "experts.") for key in state_dict):
        return []
    dense_keys = [(f"{prefix}{name}.weight", f"{prefix}{name}.bias") for name in dense_layer_names]
    if not all(w in state_dict and b in state_dict for w, b in dense_keys):
        return []
    layers = [(torch.as_tensor(state_dict[w]), torch.as_tensor(state_dict[b])) for w, b in dense_keys]
    num_experts = moe.experts.num_experts
    try:
        stacked = stack_dense_layers(layers, num_experts, moe.dims, noise_std)
    except ValueError as err:
        raise ValueError(f"cannot upcycle '{prefix}' from the dense checkpoint: {err}") from None

    report = []
    for layer, ((w, b), (experts_w, experts_b)) in enumerate(zip(dense_keys, stacked)):
        state_dict[f"{moe_prefix}experts.weights.{layer}"] = experts_w
        state_dict[f"{moe_prefix}experts.biases.{layer}"] = experts_b
        report.append(f"{w} -> {moe_prefix}experts.weights.{layer} (x{num_experts} experts)")
        report.append(f"{b} -> {moe_prefix}experts.biases.{layer} (x{num_experts} experts)")
        if moe.shared is not None:
            state_dict[f"{moe_prefix}shared.layers.{layer}.weight"] = layers[layer][0].clone()
            state_dict[f"{moe_prefix}shared.layers.{layer}.bias"] = layers[layer][1].clone()
            report.append(f"{w}, {b} -> {moe_prefix}shared.layers.{layer} (shared expert)")
        del state_dict[w], state_dict[b]
    state_dict[moe_prefix + "num_experts"] = torch.tensor(num_experts)
    return report
