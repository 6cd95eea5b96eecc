"""The one collective HI-MoE needs: a sum over data-parallel ranks that keeps local gradients."""
from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_sum(local: torch.Tensor) -> torch.Tensor:
    """Sum ``local`` (any shape, float) over all ranks, keeping this rank's gradient path.

    The value is the global sum. The gradient w.r.t. ``local`` is ``world_size`` (not 1) so
    that after DDP averages parameter gradients over ranks, a loss computed from global sums
    receives exactly its true gradient. Every rank must call this the same number of times with
    the same shape: callers use it unconditionally in training (also with zero instances).
    """
    world_size = data_parallel_world_size()
    if world_size == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    scaled = local * world_size
    return scaled - (scaled.detach() - total)
