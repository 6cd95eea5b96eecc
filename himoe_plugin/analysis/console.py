"""The one console line both frameworks print for the routing statistics (``himoe/*``); every
statistic itself goes to the framework's scalar writers (metrics.json / TensorBoard,
MMEngine's scalars file), not to the console."""
from __future__ import annotations

from typing import Dict

from ..core import STATS_PREFIX, format_routing_summary


def routing_console_line(statistics: Dict[str, float], prefix: str = STATS_PREFIX) -> str:
    """One line of the routing statistics in ``statistics`` (flat ``himoe/[<layer>/]<stat>``
    names; other names are ignored); '' if there are none.

    One MoE layer: ``himoe: load max 0.210 min 0.052  routing_entropy 1.021  dropped_fraction
    0.000``. Several (cascade stages, DETR layers): the extremes over the layers, each with the
    layer it comes from, e.g. ``himoe (12 layers): load max 0.310 (decoder.2) min 0.020
    (encoder.0)  routing_entropy 0.912 (encoder.3) .. 1.301 (decoder.0)  dropped_fraction max
    0.000 (encoder.0)``.
    """
    lines = format_routing_summary(statistics, prefix).splitlines()
    if len(lines) <= 1:
        return lines[0] if lines else ""
    per_layer: Dict[str, Dict[str, float]] = {}
    for key, value in statistics.items():
        if key.startswith(prefix):
            layer, _, stat = key[len(prefix):].rpartition("/")
            per_layer.setdefault(layer or "-", {})[stat] = float(value)

    def extreme(stat: str, pick) -> str:
        layers = [layer for layer, stats in per_layer.items() if stat in stats]
        layer = pick(layers, key=lambda name: per_layer[name][stat])
        return f"{per_layer[layer][stat]:.3f} ({layer})"

    def present(stat: str) -> bool:
        return any(stat in stats for stats in per_layer.values())

    parts = []
    if present("load_max") and present("load_min"):
        parts.append(f"load max {extreme('load_max', max)} min {extreme('load_min', min)}")
    if present("routing_entropy"):
        parts.append(f"routing_entropy {extreme('routing_entropy', min)} .. {extreme('routing_entropy', max)}")
    if present("dropped_fraction"):
        parts.append(f"dropped_fraction max {extreme('dropped_fraction', max)}")
    return f"{prefix.rstrip('/')} ({len(lines)} layers): " + "  ".join(parts)
