"""Quality on real data: dense Faster R-CNN -> (a) dense continuation vs (b) upcycled HI-MoE.

    python benchmarks/quality.py                          # ~75 min on 2 CPU cores (defaults below)
    python benchmarks/quality.py --pretrain-iters 20000 --continue-iters 5000 --seeds 1 2 3  # GPU

Detectron2, Faster R-CNN R18-FPN from scratch on Aquarium train (short side 224-288):
  1. train the dense model for --pretrain-iters iterations;
  2. for every seed, continue from that checkpoint for --continue-iters iterations (same seed,
     same data order, same schedule) (a) with the dense head and (b) with the HI-MoE head
     upcycled from it (every expert starts as the dense box head);
  3. evaluate COCO AP, AP50, APs/APm/APl on Aquarium valid (127 images).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List

from tqdm import tqdm

from timing import RESULTS_DIR, add_device_argument, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs" / "detectron2" / "aquarium"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def run(yaml: Path, output_dir: Path, iters: int, seed: int, weights: str, device, extra=()) -> Dict:
    """Train ``iters`` iterations from ``weights`` (fresh schedule), then evaluate on valid."""
    from detectron2.utils.env import seed_all_rng

    from himoe_plugin.detectron2 import get_himoe_cfg
    from himoe_plugin.detectron2.engine import HIMoETrainer

    cfg = get_himoe_cfg()
    cfg.merge_from_file(str(yaml))
    cfg.merge_from_list([
        "MODEL.DEVICE", str(device), "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(output_dir), "SEED", str(seed),
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.75)},)",
        "SOLVER.WARMUP_ITERS", str(min(100, iters // 10)), "SOLVER.CHECKPOINT_PERIOD", str(iters),
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", *extra,  # evaluated once, below
    ])
    cfg.freeze()
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_all_rng(seed)  # same data order and augmentations for runs with the same seed
    trainer = HIMoETrainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    eval_cfg = cfg.clone()
    eval_cfg.defrost()
    eval_cfg.DATASETS.TEST = ("aquarium_valid",)
    results = HIMoETrainer.test(eval_cfg, trainer.model)["bbox"]
    return {"metrics": {m: results[m] for m in METRICS}, "train_s_per_iter": train_seconds / iters,
            "checkpoint": str(output_dir / "model_final.pth")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-iters", type=int, default=1200)
    parser.add_argument("--continue-iters", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--upcycle-noise", type=float, default=0.01)
    add_device_argument(parser)
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "output" / "benchmark_quality"))
    args = parser.parse_args()
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    from himoe_plugin.detectron2 import register_bundled_datasets

    register_bundled_datasets()
    work = Path(args.work_dir)
    jobs = [("pretrain", 0, "dense")] + [(f"seed{s}", s, v) for s in args.seeds for v in ("dense", "himoe")]
    runs: List[dict] = []
    pretrained = None
    for name, seed, variant in tqdm(jobs, desc="quality runs"):
        yaml = CONFIGS / ("himoe_faster_rcnn_R_18_FPN_aquarium.yaml" if variant == "himoe"
                          else "faster_rcnn_R_18_FPN_aquarium.yaml")
        if name == "pretrain":
            result = run(yaml, work / "pretrain", args.pretrain_iters, 0, "", args.device)
            pretrained = result["checkpoint"]
        else:
            extra = ["MODEL.HIMOE.UPCYCLE_NOISE_STD", str(args.upcycle_noise)] if variant == "himoe" else []
            result = run(yaml, work / f"{name}_{variant}", args.continue_iters, seed, pretrained,
                         args.device, extra)
        runs.append(dict(name=name, seed=seed, variant=variant, **result))
        (RESULTS_DIR / "quality_partial.json").write_text(json.dumps(runs, indent=2))

    lines = [f"Dense pretraining {args.pretrain_iters} iterations, then {args.continue_iters} iterations "
             "per variant and seed; COCO bbox metrics on Aquarium valid (127 images).", "",
             "| run | seed | " + " | ".join(METRICS) + " | s/iter |",
             "|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for r in runs:
        label = "dense pretrained" if r["name"] == "pretrain" else f"{r['variant']} continuation"
        lines.append(f"| {label} | {r['seed']} | " + " | ".join(f"{r['metrics'][m]:.2f}" for m in METRICS)
                     + f" | {r['train_s_per_iter']:.2f} |")
    means = {}
    for variant in ("dense", "himoe"):
        chosen = [r for r in runs if r["variant"] == variant and r["name"] != "pretrain"]
        means[variant] = {m: sum(r["metrics"][m] for r in chosen) / len(chosen) for m in METRICS}
        lines.append(f"| **mean {variant}** | - | " + " | ".join(f"{means[variant][m]:.2f}" for m in METRICS) + " | |")
    write_results("quality", {"args": dict(vars(args), device=str(args.device)), "runs": runs, "means": means},
                  lines, args.device)
    (RESULTS_DIR / "quality_partial.json").unlink(missing_ok=True)
    plot(runs, RESULTS_DIR / "quality.png")
    print("\n".join(lines))


def plot(runs: List[dict], out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    continued = [r for r in runs if r["name"] != "pretrain"]
    seeds = sorted({r["seed"] for r in continued})
    width = 0.8 / (2 * len(seeds))
    for i, (variant, color) in enumerate((("dense", "tab:gray"), ("himoe", "tab:blue"))):
        for j, seed in enumerate(seeds):
            r = next(r for r in continued if r["variant"] == variant and r["seed"] == seed)
            offset = (i * len(seeds) + j) * width
            ax.bar([k + offset for k in range(len(METRICS))], [r["metrics"][m] for m in METRICS], width,
                   color=color, alpha=0.6 + 0.4 * j / max(1, len(seeds) - 1),
                   label=f"{variant} seed {seed}")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(METRICS))])
    ax.set_xticklabels(METRICS)
    ax.set_ylabel("COCO metric (%)")
    ax.set_title("Aquarium valid after continuation: dense vs upcycled HI-MoE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)


if __name__ == "__main__":
    main()
