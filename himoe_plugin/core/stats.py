"""Accumulate routing statistics on device; read them out (one host sync) when logging."""
from __future__ import annotations

from typing import Dict, Optional

import torch


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
