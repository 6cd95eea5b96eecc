"""HI-MoE DINO vs dense DINO vs the naive all-experts pattern, side by side (MMDetection).

    python benchmarks/dino.py                  # 512x512, 5 repeats
    python benchmarks/dino.py --quick          # 2 encoder + 2 decoder layers, 2 repeats
    python benchmarks/dino.py --device cuda
    python benchmarks/dino.py --timer cpu --threads 1   # CPU time, on a machine shared with other jobs

Contenders: the stock DINO R50 4-scale (6 + 6 layers, FFN 2048, 900 queries) and HI-MoE variants
that replace every encoder and decoder FFN. Every variant is the dense model upcycled (its
state dict loaded into the MoE model), so everything outside the FFNs is identical, experts
start as the dense FFN (copy) or slices of it (split), and only the routers are new:

  dense           stock DINO
  full            E=16 in 4 groups, scene keeps 2, k=2, shared expert (the paper's setting)
  k1              E=16 in 4 groups, scene keeps 2, k=1, no shared expert
  split_e8k2      E=8 split-upcycled (experts of 2048/8 = 256 channels), k=2, no shared expert
  naive_full      as `full`, but every expert runs on every token and the chosen ones are
                  gathered afterwards (the published reference code's pattern)

Measured in one process, each HI-MoE variant alternating with the dense model (one variant in
memory at a time), on two real Aquarium images resized and padded to the benchmark size:
inference (no-grad ``predict``, 1 image) and a training step (``loss`` forward, backward and an
SGD step, 2 images; not for naive_full, whose activations do not fit in 24 GiB). Also total vs active parameters (active: what one token uses)
and the MACs counted by mmengine's FLOP analyzer (what `get_flops.py` uses) on one inference pass.
Random weights (no pretrained weights here); BN statistics calibrated on the images.
"""
from __future__ import annotations

import argparse
import copy
import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import torch
from tqdm import tqdm

from detector import calibrate_batch_norm, data_root, mmdet_macs_by_module
from moe_layer import NaiveMoE
from timing import (add_device_argument, add_timer_arguments, apply_timer_arguments, compare, fmt_ratio,
                    ratio_summary, write_results)

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE = "mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py"

VARIANTS: Dict[str, dict] = {
    "dense": {},
    "full": dict(router=dict(num_experts=16, num_groups=4, scene_top_k=2, top_k=2), shared_expert=True),
    "k1": dict(router=dict(num_experts=16, num_groups=4, scene_top_k=2, top_k=1), shared_expert=False),
    "split_e8k2": dict(router=dict(num_experts=8, num_groups=4, scene_top_k=2, top_k=2),
                       shared_expert=False, upcycle=dict(mode="split")),
    "naive_full": dict(router=dict(num_experts=16, num_groups=4, scene_top_k=2, top_k=2), shared_expert=True),
}
#: What each variant is timed in. The naive pattern's training step is not: its saved activations
#: (every expert's hidden layer for every token, 16 x 2048 floats per token and FFN) for 2 images
#: at 512x512 exceed this machine's 24 GiB.
PHASES = {"full": ("infer", "train"), "k1": ("infer", "train"), "split_e8k2": ("infer", "train"),
          "naive_full": ("infer",)}
TARGETS = {"full": "<= 1.5 (reference code: 5.4)", "k1": "<= 1.10", "split_e8k2": "<= 1.0", "naive_full": ""}


class NaiveExperts(torch.nn.Module):
    """Drop-in for a block's ``MoEMLP`` that runs every expert on every token, then gathers."""

    def __init__(self, moe):
        super().__init__()
        self.naive = NaiveMoE(moe)

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        n, k = plan.num_instances, plan.top_k
        sorted_expert = torch.repeat_interleave(
            torch.arange(len(plan.rows_per_expert), device=x.device),
            torch.tensor(plan.rows_per_expert, device=x.device))
        expert_index = torch.zeros(n * k, dtype=torch.long, device=x.device)
        weights = torch.zeros(n * k, device=x.device)
        expert_index[plan.slot] = sorted_expert
        weights[plan.slot] = plan.combine_weight.float()
        return self.naive(x, expert_index.view(n, k), weights.view(n, k))


def config_text(variant: str, size: int, layers: int) -> str:
    moe = VARIANTS[variant]
    aquarium = str(data_root() / "aquarium") + "/"
    body = f"""
_base_ = {BASE!r}
custom_imports = dict(imports=['himoe_plugin.mmdet'], allow_failed_imports=False)
model = dict(
    backbone=dict(init_cfg=None, frozen_stages=-1, norm_eval=False,
                  norm_cfg=dict(type='BN', requires_grad=True)),
    encoder=dict(num_layers={layers}), decoder=dict(num_layers={layers}))
pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=True),
    dict(type='Pad', size=({size}, {size})),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                          'scale_factor', 'pad_shape'))]
aquarium = dict(data_root={aquarium!r}, ann_file='annotations/instances_valid.json',
                data_prefix=dict(img='images/valid/'), pipeline=pipeline,
                metainfo=dict(classes=('fish', 'jellyfish', 'penguin', 'puffin', 'shark',
                                       'starfish', 'stingray')))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        sampler=dict(shuffle=False), dataset=aquarium)
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      sampler=dict(shuffle=False), dataset=aquarium)
"""
    if moe:
        body += f"model.update(type='HIMoEDINO', moe={moe!r})\n"
    return body


@dataclass
class Contender:
    """One benchmark model: its inference and training-step calls, parameter and MAC counts."""
    run_infer: Callable[[], None]
    run_train: Callable[[], None]
    info: dict


def variant_builder(size: int, layers: int, device: torch.device) -> Callable[[str], Contender]:
    """``build(name)``: the model of ``VARIANTS[name]``. The first call builds the dense DINO
    (seed 0, BN statistics calibrated on the images); every HI-MoE variant is that dense model's
    state dict upcycled, so everything outside the FFNs is identical."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    import himoe_plugin.mmdet  # noqa: F401
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    tmp = Path(tempfile.mkdtemp())
    shared: dict = {}

    def build(name: str) -> Contender:
        path = tmp / f"{name}.py"
        path.write_text(config_text(name, size, layers))
        cfg = Config.fromfile(str(path))
        if not shared:
            shared["train_batch"] = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
            shared["infer_batch"] = next(iter(Runner.build_dataloader(cfg.val_dataloader)))
        train_batch, infer_batch = shared["train_batch"], shared["infer_batch"]
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        model.init_weights()
        if "dense_state" not in shared:
            if name != "dense":
                raise ValueError("build the dense model first: the variants are upcycled from it")
            model.to(device)
            calibrate_batch_norm(model, lambda: model.extract_feat(
                model.data_preprocessor(train_batch, True)["inputs"]))
            shared["dense_state"] = copy.deepcopy(model.state_dict())
        else:  # upcycle the dense model: identical trunk and heads, experts from its FFNs
            model.load_state_dict(shared["dense_state"], strict=False)
            model.to(device)
        if name == "naive_full":
            for ffn in model.moe_ffns:
                ffn.moe_block.moe = NaiveExperts(ffn.moe_block.moe)
        optim = build_optim_wrapper(model, dict(optimizer=dict(type="SGD", lr=1e-4, momentum=0.9)))

        def run_infer():
            model.eval()
            with torch.no_grad():
                model.test_step(infer_batch)

        def run_train():
            model.train()
            model.train_step(train_batch, optim)  # zeroes the gradients after its step

        info = dict(params=parameter_counts(model, name), gmacs=mmdet_macs_by_module(model, infer_batch)[""] / 1e9)
        return Contender(run_infer, run_train, info)

    return build


def parameter_counts(model: torch.nn.Module, name: str) -> Dict[str, int]:
    """Total parameters, and those one token uses (its k routed experts of E, plus the rest)."""
    total = sum(p.numel() for p in model.parameters())
    if name == "dense":
        return {"total": total, "active": total}
    idle = 0
    for ffn in model.moe_ffns:
        moe = ffn.moe_block.moe
        experts = moe.naive.moe.experts if name == "naive_full" else moe.experts
        per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
        idle += per_expert * (experts.num_experts - ffn.config.top_k)
    return {"total": total, "active": total - idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="images are resized and padded to size x size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6, help="encoder and decoder layers (stock: 6)")
    parser.add_argument("--quick", action="store_true", help="2 + 2 layers, 2 repeats")
    add_device_argument(parser)
    add_timer_arguments(parser)
    args = parser.parse_args()
    apply_timer_arguments(args)
    if args.quick:
        args.layers, args.repeats = 2, 2

    build = variant_builder(args.size, args.layers, args.device)
    dense = build("dense")
    info = {"dense": dense.info}
    summaries: Dict[str, Dict[str, dict]] = {"infer": {}, "train": {}}
    seconds: Dict[str, Dict[str, dict]] = {"infer": {}, "train": {}}
    # One HI-MoE variant at a time next to the dense model: all five (E=16 experts in 12 FFNs,
    # with optimizer state and training activations) do not fit in 24 GiB.
    for name in tqdm([n for n in VARIANTS if n != "dense"], desc="variants"):
        variant = build(name)
        info[name] = variant.info
        for phase in ("infer", "train"):
            if phase not in PHASES[name]:
                continue
            pair = {"dense": getattr(dense, f"run_{phase}"), name: getattr(variant, f"run_{phase}")}
            measured = compare(pair, repeats=args.repeats, device=args.device, timer=args.timer)
            summary = ratio_summary(measured, "dense")
            summaries[phase][name] = summary[name]
            summaries[phase].setdefault("dense", summary["dense"])  # seconds of the first pair
            seconds[phase][name] = measured
        del variant
        gc.collect()
    results = [dict(phase=phase, summary=summaries[phase], seconds=seconds[phase]) for phase in ("infer", "train")]

    names = [n for n in VARIANTS if n != "dense"]
    lines = [f"DINO R50 4-scale, {args.layers} + {args.layers} layers, {args.size}x{args.size}, "
             f"device {args.device}, {args.timer} time, {torch.get_num_threads()} thread(s); "
             f"median of {args.repeats} repeats of each variant alternating with the dense model; "
             "ratio = per-repeat time / dense (median, min-max).", "",
             "| phase | dense s | " + " | ".join(f"{n} / dense" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['phase']} | {s['dense']['median_s']:.2f} | "
                     + " | ".join(fmt_ratio(s[n]) if n in s else "not run" for n in names) + " |")
    lines.append("| target (infer) | | " + " | ".join(TARGETS[n] for n in names) + " |")
    lines += ["", "| model | params total (M) | params active per token (M) | GMACs (1 image, mmengine) |",
              "|---|---:|---:|---:|"]
    for name, i in info.items():
        lines.append(f"| {name} | {i['params']['total'] / 1e6:.1f} | {i['params']['active'] / 1e6:.1f} | "
                     f"{i['gmacs']:.1f} |")
    path = write_results("dino", {"size": args.size, "layers": args.layers, "repeats": args.repeats,
                                  "timer": args.timer, "info": info, "results": results}, lines, args.device)
    print("\n".join(lines))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
