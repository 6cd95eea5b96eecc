"""Fail clearly instead of running wrong: an HI-MoE head run by a parent that cannot feed it (a
stock ROI head calls its box head with the RoI features only), and a checkpoint saved with
settings that change the shape or presence of an MoE block's tensors."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import nn

from .config import MoEConfigError
from .router import saved_group_count

if TYPE_CHECKING:
    from .block import MoEBlock
    from .router import HierarchicalRouter


class _RoutingInputsCheck:
    """Forward pre-hook (a picklable object, not a closure) raising ``error(head)``."""

    def __init__(self, error: Callable[[nn.Module], Exception]):
        self.error = error

    def __call__(self, head: nn.Module, args, kwargs) -> None:
        if len(args) + len(kwargs) < 2:
            raise self.error(head)


def require_routing_inputs(head: nn.Module, error: Callable[[nn.Module], Exception]) -> None:
    """Make a call of ``head`` with nothing but the RoI features raise ``error(head)`` (instead
    of a ``TypeError`` about missing arguments deep inside a training step)."""
    head.register_forward_pre_hook(_RoutingInputsCheck(error), with_kwargs=True)


def check_block_checkpoint(block: "MoEBlock", state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Fail, naming the setting, when the checkpoint's ``MoEBlock`` at ``prefix`` was built with
    settings that change a tensor's shape or presence: a checkpointer would otherwise skip those
    tensors with a warning (or a bare size mismatch) and leave them random.

    Checked in order: the shared expert (``shared_expert``), the routers this block has (scene
    router: ``route_once``; instance router: ``instance_router``), the instance router's input
    width (``instance_uses_scene_probs``) and the experts' hidden widths (``expert_dim``).
    Expert and group counts are left to their own guards (``MoEMLP``, ``HierarchicalRouter``),
    and a state without this block's keys, or with dense layers being upcycled, passes.
    """
    router, moe, config = block.router, block.moe, block.config
    experts_key = prefix + "moe.experts.weights.0"
    saved_experts = state_dict.get(prefix + "moe.num_experts")
    saved_groups = saved_group_count(state_dict, prefix + "router.")
    if experts_key not in state_dict or (saved_experts is not None and int(saved_experts) != config.num_experts):
        return
    if saved_groups is not None and saved_groups != config.groups:
        return
    where = f"the checkpoint's MoE block at '{prefix[:-1]}'"
    saved_shared = any(k.startswith(prefix + "moe.shared.") for k in state_dict)
    if saved_shared != (moe.shared is not None):
        raise MoEConfigError(
            router.key("shared_expert"), config.shared_expert,
            f"{where} {'has' if saved_shared else 'has no'} shared expert but this model "
            f"{'has' if moe.shared is not None else 'has none'}; set it to match the checkpoint",
        )
    if saved_groups is not None:  # routers saved (upcycling from a dense checkpoint saves none)
        _check_router_parts(router, state_dict, prefix + "router.", where)
    saved_dims = [state_dict[prefix + f"moe.experts.weights.{i}"].shape
                  for i in range(len(moe.experts.weights)) if prefix + f"moe.experts.weights.{i}" in state_dict]
    model_dims = [w.shape for w in moe.experts.weights]
    if saved_dims != model_dims and len(saved_dims) == len(model_dims) and all(
        s[0] == m[0] for s, m in zip(saved_dims, model_dims)
    ) and saved_dims[0][2] == model_dims[0][2] and saved_dims[-1][1] == model_dims[-1][1]:
        raise MoEConfigError(
            router.key("expert_dim"), list(moe.dims[1:-1]),
            f"{where} has experts of hidden widths {[int(s[1]) for s in saved_dims[:-1]]} but this "
            f"model's are {list(moe.dims[1:-1])}; set it to match the checkpoint",
        )


def _check_router_parts(router: "HierarchicalRouter", state_dict: Mapping[str, torch.Tensor],
                        prefix: str, where: str) -> None:
    config = router.config
    saved_scene = prefix + "scene_router.weight" in state_dict
    saved_instance = state_dict.get(prefix + "instance_router.weight")
    if saved_scene != (router.scene_router is not None):
        raise MoEConfigError(
            router.key("route_once"), router.reused or "",
            f"{where} {'routes its scene itself' if saved_scene else 'reuses the routing of stage 0'}"
            f" but this model's {'reuses that of stage 0' if router.reused else 'routes itself'} "
            "(a later cascade stage of a model that routes once has no scene router); set it to "
            "match the checkpoint",
        )
    if (saved_instance is not None) != (router.instance_router is not None):
        if router.reused or not saved_scene:
            raise MoEConfigError(
                router.key("route_once"), router.reused or "",
                f"{where} {'has' if saved_instance is not None else 'has no'} instance router, this "
                "model's the opposite (reusing stage 0's whole routing drops it); set it to match "
                "the checkpoint",
            )
        raise MoEConfigError(
            router.key("instance_router"), config.instance_router,
            f"{where} {'has' if saved_instance is not None else 'has no'} instance router but this "
            "model's the opposite (scene-only routing has none); set it to match the checkpoint",
        )
    if saved_instance is None:
        return
    saved_width, width = int(saved_instance.shape[1]), router.instance_router.in_features
    if saved_width != width and abs(saved_width - width) == config.groups:
        raise MoEConfigError(
            router.key("instance_uses_scene_probs"), config.instance_uses_scene_probs,
            f"{where} has an instance router that {'sees' if saved_width > width else 'does not see'}"
            f" the scene probabilities ({saved_width} inputs, this model's {width}); set it to "
            "match the checkpoint",
        )
