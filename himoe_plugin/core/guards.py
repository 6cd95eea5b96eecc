"""Fail clearly when an HI-MoE head is run by a parent that cannot feed it: a stock ROI head
calls its box head with the RoI features only (no scene features, no image indices)."""
from __future__ import annotations

from typing import Callable

from torch import nn


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
