"""Fail clearly when an HI-MoE head is run by a parent that cannot feed it: a stock ROI head
calls its box head with the RoI features only (no scene features, no image indices)."""
from __future__ import annotations

from typing import Callable

from torch import nn


def require_routing_inputs(head: nn.Module, error: Callable[[], Exception]) -> None:
    """Make a call of ``head`` with nothing but the RoI features raise ``error()`` (instead of a
    ``TypeError`` about missing arguments deep inside a training step)."""

    def check(module: nn.Module, args, kwargs) -> None:
        if len(args) + len(kwargs) < 2:
            raise error()

    head.register_forward_pre_hook(check, with_kwargs=True)
