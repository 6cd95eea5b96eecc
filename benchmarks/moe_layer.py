"""MoE layer cost vs one dense expert and vs the naive all-experts pattern (side by side).

    python benchmarks/moe_layer.py                 # default grid, ~15 min on 2 CPU cores
    python benchmarks/moe_layer.py --quick         # smoke run
    python benchmarks/moe_layer.py --full          # every E x k x shared x N for every layer
    python benchmarks/moe_layer.py --device cuda --autocast bfloat16 --expert-backend grouped_mm   # GPU
    python benchmarks/moe_layer.py --top-k 1 --timer cpu --threads 1   # CPU time, on a busy machine

Contenders on the same inputs, timed alternately in one process:
  dense  one expert MLP (the layer HI-MoE replaces)
  himoe  hierarchical router + sparse dispatch (each expert runs on its own instances only)
  naive  same router, every expert on every instance, combined afterwards (the pattern of the
         published reference code)
Reported: per-repeat time ratios to dense (median, min-max), for forward+backward ("train") and
no-grad forward ("infer"). Target: himoe <= 1.10 x (k + shared) and flat in E. Training
contenders start every call with cleared gradients, as after ``optimizer.zero_grad()``.
"""
from __future__ import annotations

import argparse
import itertools
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from himoe_plugin.core import EXPERT_BACKENDS, DenseMLP, HierarchicalRouter, MoEConfig, MoEMLP

from timing import (add_device_argument, add_timer_arguments, apply_timer_arguments, compare, fmt_ratio,
                    ratio_summary, write_results)

LAYERS = {
    "box_fc1": ([12544, 1024], True),  # fc6 of the Faster R-CNN box head (256x7x7 -> 1024)
    "box_fc2": ([1024, 1024], True),  # fc7
    "detr_ffn": ([256, 2048, 256], False),  # a DETR decoder FFN
}
NUM_IMAGES = 2


class NaiveMoE(torch.nn.Module):
    """All experts on all instances, then gather the chosen ones (what HI-MoE avoids)."""

    def __init__(self, moe: MoEMLP):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        experts = self.moe.experts
        everything = torch.stack(
            [
                _mlp_of(experts, e, x)
                for e in range(experts.num_experts)
            ]
        )  # (E, N, d_out)
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        chosen = everything[expert_index, rows]  # (N, k, d_out)
        routed = (chosen * weights.unsqueeze(-1)).sum(1)
        if self.moe.shared is None:
            return routed
        s = self.moe.shared_expert_weight
        return (1 - s) * routed + s * self.moe.shared(x)


def _mlp_of(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    last = len(experts.weights) - 1
    for i, (w, b) in enumerate(zip(experts.weights, experts.biases)):
        x = torch.nn.functional.linear(x, w[e], b[e])
        if i < last or experts.activate_output:
            x = torch.relu(x)
    return x


def contenders(layer: str, num_experts: int, top_k: int, shared: bool, n: int, train: bool, with_naive: bool,
               device: torch.device = torch.device("cpu"), expert_backend: str = "auto",
               autocast: Optional[torch.dtype] = None) -> Dict[str, Callable[[], object]]:
    dims, activate_output = LAYERS[layer]
    torch.manual_seed(0)
    config = MoEConfig(num_experts=num_experts, top_k=top_k, scene_top_k=max(top_k, num_experts // 2),
                       shared_expert=shared)
    router = HierarchicalRouter(config, scene_dim=256, instance_dim=dims[0]).train(train).to(device)
    moe = MoEMLP(num_experts, dims, shared_expert=shared, activate_output=activate_output,
                 expert_backend=expert_backend).to(device)
    dense = DenseMLP(dims, activate_output).to(device)
    naive = NaiveMoE(moe)
    x = torch.randn(n, dims[0], device=device, requires_grad=train)
    scene = torch.randn(NUM_IMAGES, 256, device=device)
    image_index = torch.arange(n, device=device) * NUM_IMAGES // n

    def clear_grads(*modules):
        x.grad = None
        for module in modules:
            module.zero_grad(set_to_none=True)

    def run_dense():
        clear_grads(dense)
        out = dense(x)
        if train:
            out.sum().backward()

    def run_himoe():
        clear_grads(router, moe)
        routing = router(scene, x, image_index)
        out = moe(x, routing.plan)
        if train:
            (out.sum() + sum(routing.losses.values())).backward()

    def run_naive():
        clear_grads(router, moe)
        routing = router(scene, x, image_index)
        out = naive(x, routing.expert_index, routing.combine_weight)
        if train:
            (out.sum() + sum(routing.losses.values())).backward()

    chosen = {"dense": run_dense, "himoe": run_himoe}
    if with_naive:
        chosen["naive"] = run_naive
    return {name: _in_context(fn, train, device, autocast) for name, fn in chosen.items()}


def _in_context(fn, train: bool, device: torch.device, autocast: Optional[torch.dtype]):
    """``fn`` under no_grad unless training, and under autocast when ``autocast`` is a dtype."""
    def run():
        with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            fn()
    return run


def grid(mode: str) -> List[dict]:
    rows = []
    if mode == "quick":
        for layer in LAYERS:
            for num_experts in (4, 16):
                rows.append(dict(layer=layer, E=num_experts, k=2, shared=False, N=512, naive=True))
        return rows
    experts, ks, shareds = (4, 8, 16, 32), (1, 2), (False, True)
    for layer in LAYERS:
        sizes = (512, 2048, 8192)
        if mode == "full":
            for num_experts, k, shared, n in itertools.product(experts, ks, shareds, sizes):
                rows.append(dict(layer=layer, E=num_experts, k=k, shared=shared, N=n, naive=True))
            continue
        sweep_n = 512 if layer == "box_fc1" else 2048  # fc1 is 12x the cost of the others
        for num_experts, k, shared in itertools.product(experts, ks, shareds):
            rows.append(dict(layer=layer, E=num_experts, k=k, shared=shared, N=sweep_n,
                             naive=not shared and (k == 2)))
        for n in sizes:
            if n != sweep_n:
                rows.append(dict(layer=layer, E=16, k=2, shared=False, N=n, naive=False))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="moe_layer")
    parser.add_argument("--expert-backend", default="auto", choices=EXPERT_BACKENDS)
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2], help="run only the rows of these k")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], default=None,
                        help="run every contender under torch.autocast with this dtype")
    add_device_argument(parser)
    add_timer_arguments(parser)
    args = parser.parse_args()
    apply_timer_arguments(args)
    rows = [r for r in grid("quick" if args.quick else "full" if args.full else "default") if r["k"] in args.top_k]

    results = []
    for row in tqdm(rows, desc="MoE layer configs"):
        for phase in ("train", "infer"):
            seconds = compare(
                contenders(row["layer"], row["E"], row["k"], row["shared"], row["N"], phase == "train", row["naive"],
                           args.device, args.expert_backend, getattr(torch, args.autocast) if args.autocast else None),
                repeats=args.repeats, device=args.device, timer=args.timer,
            )
            results.append(dict(row, phase=phase, target=1.10 * (row["k"] + row["shared"]),
                                summary=ratio_summary(seconds, "dense"), seconds=seconds))

    lines = [
        "| layer | E | k | shared | N | phase | dense ms | HI-MoE / dense | target | naive / dense |",
        "|---|---:|---:|:---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["summary"]
        naive = fmt_ratio(s["naive"]) if "naive" in s else "-"
        lines.append(
            f"| {r['layer']} | {r['E']} | {r['k']} | {'on' if r['shared'] else 'off'} | {r['N']} | {r['phase']} "
            f"| {1000 * s['dense']['median_s']:.1f} | {fmt_ratio(s['himoe'])} | {r['target']:.2f} | {naive} |"
        )
    payload = {"repeats": args.repeats, "expert_backend": args.expert_backend, "autocast": args.autocast,
               "timer": args.timer, "threads": torch.get_num_threads(), "results": results}
    path = write_results(args.name, payload, lines, args.device)
    plot(results, path.with_suffix(".png"))
    print("\n".join(lines))
    print(f"\nwrote {path}")


def plot(results: List[dict], out_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in results})
    fig, axes = plt.subplots(2, len(layers), figsize=(5 * len(layers), 8), squeeze=False)
    for col, layer in enumerate(layers):
        for row_i, phase in enumerate(("train", "infer")):
            ax = axes[row_i][col]
            subset = [r for r in results if r["layer"] == layer and r["phase"] == phase]
            sweep_n = max((r["N"] for r in subset), key=lambda n: sum(x["N"] == n for x in subset), default=None)
            for k, shared in itertools.product((1, 2), (False, True)):
                pts = sorted((r["E"], r["summary"]["himoe"]["ratio_median"]) for r in subset
                             if r["k"] == k and r["shared"] == shared and r["N"] == sweep_n)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"HI-MoE k={k}{' +shared' if shared else ''}")
            naive = sorted((r["E"], r["summary"]["naive"]["ratio_median"]) for r in subset
                           if "naive" in r["summary"] and r["N"] == sweep_n)
            if naive:
                ax.plot(*zip(*naive), marker="x", linestyle="--", color="gray", label="naive (all experts)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("number of experts E")
            ax.set_ylabel("time / one dense expert")
            ax.set_title(f"{layer}, N={sweep_n}, {phase}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)


if __name__ == "__main__":
    main()
