"""Side-by-side timing on a shared, noisy machine: interleaved repeats, medians, ratios, spread.

Every benchmark times its contenders in the same process, alternating them within each repeat,
and reports per-repeat ratios to a baseline (median and min-max), never absolute targets.
On CUDA the timers wait for the device (``torch.cuda.synchronize``) before starting and stopping.
The ``cpu`` timer counts the process's CPU time instead of wall time: on a machine whose cores are
oversubscribed by other jobs, waiting for a time slice then costs nothing (use it with one
thread; shared caches and memory bandwidth still add noise).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=parse_device, default="cpu",
                        help="torch device to run on: cpu (default), cuda, cuda:1, ...")


def add_timer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timer", choices=list(TIMERS), default="wall",
                        help="wall time (default) or this process's CPU time (CPU runs only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def apply_timer_arguments(args: argparse.Namespace) -> None:
    """Checks ``--timer`` against ``--device`` and sets ``--threads``."""
    if args.timer == "cpu" and args.device.type != "cpu":
        raise SystemExit("--timer cpu measures CPU time: use it with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)


def parse_device(name: str) -> torch.device:
    """``--device`` value: a torch device that exists on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: CUDA is not available on this machine")
    return device


def synchronize(device: Optional[torch.device]) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: Optional[torch.device] = None, timer: str = "wall") -> float:
    clock = TIMERS[timer]
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def compare(
    contenders: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: Optional[torch.device] = None,
    timer: str = "wall",
) -> Dict[str, List[float]]:
    """Seconds per call of every contender; each repeat runs all of them, in rotating order."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds[name].append(time_call(contenders[name], device, timer))
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


def machine_description(device: Optional[torch.device] = None) -> Dict[str, object]:
    description = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": str(device or torch.device("cpu")),
    }
    if device is not None and device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def write_results(
    name: str, payload: Dict[str, object], table_lines: Sequence[str], device: Optional[torch.device] = None
) -> Path:
    """``results/<name>.json`` and ``results/<name>.md``; returns the JSON path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    payload = dict(payload, machine=machine_description(device))
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2))
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(table_lines) + "\n")
    return json_path


def fmt_ratio(summary: Dict[str, float]) -> str:
    return f"{summary['ratio_median']:.2f} ({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f})"
