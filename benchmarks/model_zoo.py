"""Model-zoo entries this project trains itself: Aquarium CPU configs, dense and HI-MoE, in both
frameworks; every checkpoint is published and the published file evaluated with the tools.

    python benchmarks/model_zoo.py                      # 4 entries x 200 iterations, ~1 h on 2 cores
    python benchmarks/model_zoo.py --iters 1500 --device cuda

For every entry: train the config for --iters iterations from scratch (the recipe of
benchmarks/quality.py: warm-up iters/10 (at most 100), lr x0.1 at 3/4), publish the final
checkpoint (Detectron2: tools/publish_detectron2_model.py; MMDetection: mmdet's own
model_converters/publish_model.py), evaluate the published file on all of Aquarium valid with
tools/train_net.py --eval-only or mmdet's test.py, and record box AP,
APs/APm/APl, train s/iter, inference s/img, peak memory (resident set of the training process)
and the sha256 of the published file. Writes benchmarks/results/model_zoo.{json,md}; the
checkpoints stay in --work-dir (default output/model_zoo/), never in the repository.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from tqdm import tqdm

from timing import write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
D2_CONFIGS = REPO_ROOT / "configs" / "detectron2" / "aquarium"
MMDET_CONFIGS = REPO_ROOT / "configs" / "mmdet" / "aquarium"
METRICS = ("AP", "AP50", "APs", "APm", "APl")
ENTRIES = [  # name, framework, config
    ("faster_rcnn_R_18_FPN_aquarium", "detectron2", D2_CONFIGS / "faster_rcnn_R_18_FPN_aquarium.yaml"),
    ("himoe_faster_rcnn_R_18_FPN_aquarium", "detectron2", D2_CONFIGS / "himoe_faster_rcnn_R_18_FPN_aquarium.yaml"),
    ("faster-rcnn_r18_fpn_aquarium_cpu", "mmdet", MMDET_CONFIGS / "faster-rcnn_r18_fpn_aquarium_cpu.py"),
    ("himoe-faster-rcnn_r18_fpn_aquarium_cpu", "mmdet", MMDET_CONFIGS / "himoe-faster-rcnn_r18_fpn_aquarium_cpu.py"),
]


def run(command: List[str], log: Path) -> str:
    """Run ``command`` under /usr/bin/time (peak resident memory), output to ``log``; returns it.
    A step whose log shows it completed (a run interrupted later) is not run again."""
    if log.exists() and "PEAK_RSS_KB=" in log.read_text() and "exited with non-zero" not in log.read_text():
        return log.read_text()
    with open(log, "w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB=%M", *command], cwd=REPO_ROOT,
                              stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    text = log.read_text()
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed, see {log}:\n{text[-3000:]}")
    return text


def peak_rss_gb(output: str) -> float:
    return int(re.findall(r"PEAK_RSS_KB=(\d+)", output)[-1]) / 2**20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def d2_copypaste(log_text: str) -> Dict[str, float]:
    """COCO bbox metrics from Detectron2's ``copypaste`` log lines (the first table: bbox)."""
    header = "copypaste: AP,AP50,AP75,APs,APm,APl"
    values = log_text.split(header)[1].splitlines()[1].split("copypaste:")[1].strip().split(",")
    named = dict(zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], (float(v) for v in values)))
    return {m: named[m] for m in METRICS}


def train_detectron2(name: str, yaml: Path, work: Path, iters: int, device: str) -> Dict:
    python, train_net = sys.executable, str(REPO_ROOT / "tools" / "train_net.py")
    schedule = ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.75)},)",
                "SOLVER.WARMUP_ITERS", str(min(100, iters // 10)), "SOLVER.CHECKPOINT_PERIOD", str(iters),
                "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", device]
    out = run([python, train_net, "--config-file", str(yaml), *schedule, "DATASETS.TEST", "()",
               "OUTPUT_DIR", str(work / "train")], work / "train.log")
    records = [json.loads(line) for line in (work / "train" / "metrics.json").read_text().splitlines()]
    s_per_iter = statistics.median(r["time"] for r in records if "time" in r)
    published = Path(subprocess.run(
        [python, str(REPO_ROOT / "tools" / "publish_detectron2_model.py"), str(work / "train" / "model_final.pth"),
         str(work / f"{name}.pth")], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip())
    eval_log = run([python, train_net, "--config-file", str(yaml), "--eval-only", "MODEL.WEIGHTS", str(published),
                    "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", device, "OUTPUT_DIR", str(work / "eval")],
                   work / "eval.log")
    return {"metrics": d2_copypaste(eval_log), "train_s_per_iter": s_per_iter, "peak_memory_gb": peak_rss_gb(out),
            "infer_s_per_img": float(re.findall(r"\(([\d.]+) s / iter per device", eval_log)[-1]),
            "published": str(published), "sha256": sha256(published), "evaluated_with": "tools/train_net.py --eval-only"}


def mmdet_metrics(text: str) -> Dict[str, float]:
    keys = {"AP": "bbox_mAP", "AP50": "bbox_mAP_50", "APs": "bbox_mAP_s", "APm": "bbox_mAP_m", "APl": "bbox_mAP_l"}
    return {m: 100 * float(re.findall(rf"coco/{key}: ([-\d.]+)", text)[-1]) for m, key in keys.items()}


def train_mmdet(name: str, config: Path, work: Path, iters: int) -> Dict:
    """MMEngine picks the device itself (CUDA when available)."""
    run_tool = str(REPO_ROOT / "tools" / "mmdet" / "run_tool.py")
    schedule = work / "schedule.py"
    warmup = min(100, iters // 10)
    schedule.write_text(f"""_base_ = {str(config)!r}
train_cfg = dict(max_iters={iters}, val_interval={iters})
val_cfg = None  # evaluated once, below, from the published file
val_dataloader = None
val_evaluator = None
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end={warmup}),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end={iters}, milestones=[{int(iters * 0.75)}], gamma=0.1),
]
default_hooks = dict(checkpoint=dict(interval={iters}))
""")
    out = run([sys.executable, run_tool, "train.py", str(schedule), "--work-dir", str(work / "train")],
              work / "train.log")
    scalars = next((work / "train").glob("*/vis_data/scalars.json"))
    records = [json.loads(line) for line in scalars.read_text().splitlines()]
    s_per_iter = statistics.median(r["time"] for r in records if "time" in r and "loss" in r)
    stock_publish = "model_converters/publish_model.py"
    run([sys.executable, run_tool, stock_publish, str(work / "train" / f"iter_{iters}.pth"),
         str(work / f"{name}.pth")], work / "publish.log")
    published = next(p for p in work.glob(f"{name}-*.pth"))
    test_log = run([sys.executable, run_tool, "test.py", str(config), str(published),
                    "--work-dir", str(work / "test")], work / "test.log")
    times = re.findall(r"(?:Epoch|Iter)\(test\).*?\stime: ([\d.]+)", test_log)  # last: the mean
    return {"metrics": mmdet_metrics(test_log), "train_s_per_iter": s_per_iter, "peak_memory_gb": peak_rss_gb(out),
            "infer_s_per_img": float(times[-1]) / 2,  # test batch size 2
            "published": str(published), "sha256": sha256(published),
            "evaluated_with": "mmdet tools/test.py (published by mmdet's publish_model.py)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None,
                        help="(re)run only these entries (default: those not in the work dir's partial results)")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "output" / "model_zoo"))
    args = parser.parse_args()
    partial = Path(args.work_dir) / "model_zoo_partial.json"
    done = json.loads(partial.read_text()) if partial.exists() else {}
    for name, framework, config in tqdm(ENTRIES, desc="model zoo"):
        if (name not in args.only) if args.only is not None else (name in done):
            continue
        work = Path(args.work_dir) / name
        work.mkdir(parents=True, exist_ok=True)
        if framework == "detectron2":
            result = train_detectron2(name, config, work, args.iters, args.device)
        else:
            result = train_mmdet(name, config, work, args.iters)
        done[name] = dict(framework=framework, config=str(config.relative_to(REPO_ROOT)), iters=args.iters, **result)
        partial.write_text(json.dumps(done, indent=2))

    lines = [f"Aquarium, trained from scratch for {args.iters} iterations (batch 2, device {args.device}); "
             "COCO box metrics of the published checkpoint on all 127 Aquarium valid images.", "",
             "| framework | config | box AP | AP50 | APs | APm | APl | train s/iter | inference s/img | memory (GB) | sha256 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in done.items():
        m = r["metrics"]
        lines.append(f"| {r['framework']} | `{r['config']}` | " + " | ".join(f"{m[k]:.2f}" for k in METRICS)
                     + f" | {r['train_s_per_iter']:.2f} | {r['infer_s_per_img']:.3f} | {r['peak_memory_gb']:.1f}"
                     f" | `{r['sha256'][:16]}` |")
    write_results("model_zoo", {"args": vars(args), "entries": done}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
