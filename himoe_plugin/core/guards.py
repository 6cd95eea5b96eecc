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
    tensors with a warning (fvcore drops shape-mismatched ones before loading) and leave them
    random.

    Read from the records the block saves (``moe.expert_dims``, ``router.instance_routing``)
    and from which tensors the checkpoint has: the experts' hidden widths (``expert_dim``),
    the shared expert (``shared_expert``), the instance router (``instance_router``,
    ``instance_uses_scene_probs``) and whether this block routes its scene itself
    (``route_once``). Expert and group counts are left to their own guards (``MoEMLP``,
    ``HierarchicalRouter``). A state without this block's experts passes.
    """
    router, moe, config = block.router, block.moe, block.config
    saved_experts = state_dict.get(prefix + "moe.num_experts")
    saved_groups = saved_group_count(state_dict, prefix + "router.")
    if (saved_experts is not None and int(saved_experts) != config.num_experts) or (
        saved_groups is not None and saved_groups != config.groups
    ):
        return
    where = f"the checkpoint's MoE block at '{prefix[:-1]}'"
    saved_dims = state_dict.get(prefix + "moe.expert_dims")
    if saved_dims is not None and saved_dims.tolist() != list(moe.dims):
        saved_dims = saved_dims.tolist()
        same_ends = len(saved_dims) == len(moe.dims) and (saved_dims[0], saved_dims[-1]) == (moe.dims[0], moe.dims[-1])
        raise MoEConfigError(
            router.key("expert_dim"), list(moe.dims[1:-1]),
            f"{where} has experts of widths {saved_dims} but this model's are {list(moe.dims)}; "
            + ("set it to match the checkpoint" if same_ends else "the box head's fc layers differ"),
        )
    if not any(k.startswith(prefix + "moe.experts.") for k in state_dict):
        return
    saved_shared = any(k.startswith(prefix + "moe.shared.") for k in state_dict)
    if saved_shared != (moe.shared is not None):
        raise MoEConfigError(
            router.key("shared_expert"), config.shared_expert,
            f"{where} {'has' if saved_shared else 'has no'} shared expert but this model "
            f"{'has' if moe.shared is not None else 'has none'}; set it to match the checkpoint",
        )
    if saved_groups is not None:  # routers saved (upcycling from a dense checkpoint saves none)
        _check_router_parts(router, state_dict, prefix + "router.", where)


def _check_router_parts(router: "HierarchicalRouter", state_dict: Mapping[str, torch.Tensor],
                        prefix: str, where: str) -> None:
    config = router.config
    saved = state_dict.get(prefix + "instance_routing")
    if saved is not None:
        saved_router, saved_scene_probs = (bool(v) for v in saved.tolist())
        if saved_router != config.instance_router:
            raise MoEConfigError(
                router.key("instance_router"), config.instance_router,
                f"{where} routes {'every instance' if saved_router else 'on the scene alone'} "
                f"(instance_router={saved_router}); set it to match the checkpoint",
            )
        if saved_router and saved_scene_probs != config.instance_uses_scene_probs:
            raise MoEConfigError(
                router.key("instance_uses_scene_probs"), config.instance_uses_scene_probs,
                f"{where} has an instance router that {'sees' if saved_scene_probs else 'does not see'} "
                "the scene probabilities; set it to match the checkpoint",
            )
    saved_scene = prefix + "scene_router.weight" in state_dict
    if saved_scene != (router.scene_router is not None):
        raise MoEConfigError(
            router.key("route_once"), router.reused or "",
            f"{where} {'routes its scene itself' if saved_scene else 'reuses the routing of stage 0'}"
            f" but this model's {'reuses that of stage 0' if router.reused else 'routes itself'} "
            "(later cascade stages of a model that routes once have no scene router); set it to "
            "match the checkpoint",
        )
