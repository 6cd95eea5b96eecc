"""Side-by-side timing on a shared, noisy machine: interleaved repeats, medians, ratios, spread.

Every benchmark times its contenders in the same process, alternating them within each repeat,
and reports per-repeat ratios to a baseline (median and min-max), never absolute targets.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(contenders: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of every contender; each repeat runs all of them, in rotating order."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds[name].append(time_call(contenders[name]))
    return seconds


def ratio_summary(seconds: Dict[str, List[float]], baseline: str) -> Dict[str, Dict[str, float]]:
    """Per contender: median seconds, and the median / min / max of per-repeat ratios to baseline."""
    base = seconds[baseline]
    out = {}
    for name, values in seconds.items():
        ratios = [v / b for v, b in zip(values, base)]
        out[name] = {
            "median_s": statistics.median(values),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return out


def machine_description() -> Dict[str, object]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def write_results(name: str, payload: Dict[str, object], table_lines: Sequence[str]) -> Path:
    """``results/<name>.json`` and ``results/<name>.md``; returns the JSON path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    payload = dict(payload, machine=machine_description())
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2))
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(table_lines) + "\n")
    return json_path


def fmt_ratio(summary: Dict[str, float]) -> str:
    return f"{summary['ratio_median']:.2f} ({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f})"
