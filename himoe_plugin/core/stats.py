"""Routing statistics: accumulated on device by every ``MoEBlock``, read out (one host sync per
block) when logging, and the compact console summary."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

#: Prefix of every routing statistic the adapters log (``himoe/<scope>/<name>``).
STATS_PREFIX = "himoe/"


class RoutingStatsMeter:
    """Running mean of ``Routing.statistics`` over the steps since the last ``summary()``."""

    def __init__(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}
        self._steps = 0

    @property
    def steps(self) -> int:
        return self._steps

    def update(self, statistics: Dict[str, torch.Tensor]) -> None:
        for name, value in statistics.items():
            value = value.detach().float()
            previous: Optional[torch.Tensor] = self._sums.get(name)
            self._sums[name] = value if previous is None else previous + value
        self._steps += 1

    def summary(self, prefix: str = "") -> Dict[str, float]:
        """Flat ``{prefix + name: mean}`` (vectors become ``name/<index>``), then reset."""
        if self._steps == 0:
            return {}
        names, shapes, values = [], [], []
        for name, total in self._sums.items():
            names.append(name)
            shapes.append(total.shape)
            values.append(total.reshape(-1) / self._steps)
        host = torch.cat(values).tolist()
        self._sums, self._steps = {}, 0
        out: Dict[str, float] = {}
        offset = 0
        for name, shape in zip(names, shapes):
            if len(shape) == 0:
                out[prefix + name] = host[offset]
                offset += 1
                continue
            for i in range(shape[0]):
                out[f"{prefix}{name}/{i}"] = host[offset + i]
            offset += shape[0]
        return out


def collect_routing_statistics(model: nn.Module, prefix: str = STATS_PREFIX) -> Dict[str, float]:
    """Mean routing statistics of every ``MoEBlock`` in ``model`` since the last call (then reset).

    Names are ``<prefix><scope>/<stat>`` (vectors: ``.../<stat>/<index>``), where the scope is the
    block's ``stats_scope``, else its module path; a model with one unscoped block gets no scope
    (``himoe/expert_load/0``). Blocks that saw no training step since the last call are skipped.
    Besides the meter's statistics, every block reports ``load_max`` and ``load_min``: the
    largest and smallest entry of its mean ``expert_load`` (the compact summary consoles show).
    """
    from .block import MoEBlock  # the block holds a meter: imported here, not at the top

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEBlock)]
    out: Dict[str, float] = {}
    for name, block in blocks:
        scope = block.stats_scope or (name if len(blocks) > 1 else "")
        block_prefix = f"{prefix}{scope}/" if scope else prefix
        stats = block.statistics.summary(block_prefix)
        loads = [value for key, value in stats.items() if key.startswith(f"{block_prefix}expert_load/")]
        if loads:
            stats[f"{block_prefix}load_max"] = max(loads)
            stats[f"{block_prefix}load_min"] = min(loads)
        out.update(stats)
    return out


#: Statistics of the compact console summary (``format_routing_summary``), in order.
SUMMARY_STATISTICS = ("load_max", "load_min", "routing_entropy", "dropped_fraction")


def format_routing_summary(statistics: Dict[str, float], prefix: str = STATS_PREFIX) -> str:
    """One line per MoE layer scope, e.g. ``himoe: load max 0.210 min 0.052  routing_entropy 1.021
    dropped_fraction 0.000``, from the flat names ``collect_routing_statistics`` writes; '' if
    there are none."""
    scopes: Dict[str, Dict[str, float]] = {}
    for key, value in statistics.items():
        scope, _, stat = key[len(prefix):].rpartition("/")
        if key.startswith(prefix) and stat in SUMMARY_STATISTICS:
            scopes.setdefault(scope, {})[stat] = value
    lines = []
    for scope, stats in scopes.items():
        parts = []
        if "load_max" in stats and "load_min" in stats:
            parts.append(f"load max {stats['load_max']:.3f} min {stats['load_min']:.3f}")
        parts += [f"{stat} {stats[stat]:.3f}" for stat in SUMMARY_STATISTICS[2:] if stat in stats]
        lines.append(f"{prefix}{scope}: " if scope else f"{prefix.rstrip('/')}: ")
        lines[-1] += "  ".join(parts)
    return "\n".join(lines)
