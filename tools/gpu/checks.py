#!/usr/bin/env python
"""The Python stages of tools/gpu/run_checks.sh (each one a subcommand; run_checks.sh budgets them).

    checks.py environment --out F.json                  GPU, driver, Python and package versions
    checks.py bench --work W [--tiny] NAME -- ARGS...   benchmarks/NAME.py ARGS, in a scratch copy
    checks.py quality --work W --data-root D --device cuda --budget-s S [--tiny]
    checks.py summary --work W --out F.json             stages + results -> one summary

``bench`` runs a copy of ``benchmarks/`` under W, so the results it writes (``results/*.json``)
stay out of the checkout; ``--tiny`` shrinks moe_layer's grid to toy widths and detector's model to
R18 with a 256-wide box head and 100 proposals (the CPU dry run).
``quality`` trains the dense and the HI-MoE Detectron2 Faster R-CNN R18-FPN Aquarium configs
(configs/detectron2/aquarium/) from scratch with the same seed and schedule through
tools/train_net.py, then evaluates COCO AP on Aquarium valid. The schedule is sized to the
budget: a short probe run measures the HI-MoE model's seconds per iteration first.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs" / "detectron2" / "aquarium"
QUALITY_MODELS = {"dense": CONFIGS / "faster_rcnn_R_18_FPN_aquarium.yaml",
                  "himoe": CONFIGS / "himoe_faster_rcnn_R_18_FPN_aquarium.yaml"}
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
VERSIONED = ("torch", "torchvision", "numpy", "detectron2", "fvcore", "pycocotools", "himoe_plugin", "setuptools")


# ----------------------------------------------------------------------------- environment
def environment(out: Path) -> None:
    import importlib.metadata as metadata
    import platform

    import torch

    env: Dict[str, object] = {"python": platform.python_version(), "executable": sys.executable,
                              "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                              "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   nccl=".".join(map(str, torch.cuda.nccl.version())), cudnn=torch.backends.cudnn.version(),
                   grouped_mm=hasattr(torch, "_grouped_mm"))
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            env["nvidia_smi"] = f"unavailable: {err}"
    versions = {}
    for module in VERSIONED:
        try:
            imported = importlib.import_module(module)
            versions[module] = getattr(imported, "__version__", None) or metadata.version(module)
            versions[module + "_path"] = str(Path(imported.__file__).parent)
        except Exception as err:  # noqa: BLE001 - reported, not fatal: the later stages say more
            versions[module] = f"missing: {type(err).__name__}: {err}"
    env["packages"] = versions
    out.write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2))
    if any(str(v).startswith("missing") for k, v in versions.items() if not k.endswith("_path")):
        sys.exit("environment: a package is missing (see above)")


# ----------------------------------------------------------------------------- benchmarks
def shrink_moe_layer(module) -> None:
    """Toy widths and a 2-row grid (the CPU dry run): the same code paths, seconds instead of minutes."""
    module.LAYERS = {"box_fc2": ([64, 64], True), "detr_ffn": ([32, 64, 32], False)}
    module.grid = lambda mode: [dict(layer=layer, E=4, k=2, shared=shared, N=64, naive=True)
                                for layer, shared in (("box_fc2", False), ("detr_ffn", True))]


#: The dry run's detector: R18, 256-wide box head, 100 proposals (benchmarks/detector.py builds R50).
TINY_DETECTOR_OPTS = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                      "MODEL.ROI_BOX_HEAD.FC_DIM", "256", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
                      "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"]


def shrink_detector() -> None:
    """Append ``TINY_DETECTOR_OPTS`` to the one ``merge_from_list`` detector.py applies to each
    config (this process runs nothing else)."""
    from detectron2.config import CfgNode

    merge = CfgNode.merge_from_list
    CfgNode.merge_from_list = lambda cfg, opts: merge(cfg, list(opts) + TINY_DETECTOR_OPTS)


def bench(name: str, work: Path, tiny: bool, args: List[str]) -> None:
    scratch = work / "bench"
    copy = scratch / "benchmarks"
    copy.mkdir(parents=True, exist_ok=True)
    for source in (REPO_ROOT / "benchmarks").glob("*.py"):
        shutil.copy(source, copy / source.name)
    if not (scratch / "configs").exists():
        (scratch / "configs").symlink_to(REPO_ROOT / "configs")
    sys.path.insert(0, str(copy))
    module = importlib.import_module(name)
    if tiny and name == "moe_layer":
        shrink_moe_layer(module)
    if tiny and name == "detector":
        shrink_detector()
    sys.argv = [f"{name}.py", *args]
    module.main()
    results = work / "results"
    results.mkdir(exist_ok=True)
    for produced in (copy / "results").glob("*"):
        shutil.copy(produced, results / produced.name)


# ----------------------------------------------------------------------------- quality
def train_net(model: str, work: Path, data_root: Path, opts: List[str], timeout_s: float) -> Dict[str, object]:
    """One tools/train_net.py run (train, then COCO evaluation unless DATASETS.TEST is empty)."""
    out_dir = work / model
    log = work / f"{model}.log"
    command = [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file",
               str(QUALITY_MODELS[model.split("_")[0]]), "--data-root", str(data_root), *opts, "OUTPUT_DIR", str(out_dir)]
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result: Dict[str, object] = {"returncode": rc, "wall_s": round(time.perf_counter() - start, 1), "log": log.name}
    metrics = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()] \
        if (out_dir / "metrics.json").exists() else []
    trained = [m for m in metrics if "total_loss" in m]
    if trained:
        result.update(iterations=trained[-1]["iteration"] + 1, final_total_loss=trained[-1]["total_loss"])
    timed = [m for m in metrics if "time" in m]  # median of the last 20 iterations' times
    if timed:
        result["s_per_iter"] = round(timed[-1]["time"], 4)
    result["bbox"] = parse_copypaste(log.read_text())
    return result


def parse_copypaste(log_text: str) -> Optional[Dict[str, float]]:
    """COCO bbox metrics from Detectron2's ``copypaste:`` log lines (None if absent)."""
    lines = re.findall(r"copypaste: (.*)", log_text)
    for i, line in enumerate(lines[:-2]):
        if line.strip() == "Task: bbox":
            names, values = lines[i + 1].split(","), lines[i + 2].split(",")
            return {n.strip(): float(v) for n, v in zip(names, values)}
    return None


def quality(work: Path, data_root: Path, device: str, budget_s: float, tiny: bool, batch: int, seed: int,
            eval_s: float) -> None:
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cuda = device.startswith("cuda")
    common = ["MODEL.DEVICE", device, "SEED", str(seed), "SOLVER.IMS_PER_BATCH", str(batch),
              "SOLVER.BASE_LR", "0.02", "SOLVER.AMP.ENABLED", str(cuda),  # Detectron2's AMP needs CUDA
              "DATALOADER.NUM_WORKERS", str(min(8, os.cpu_count() or 1) if cuda else 0),
              "TEST.EVAL_PERIOD", "0"]
    if tiny:
        common += ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "213", "INPUT.MIN_SIZE_TEST", "128",
                   "INPUT.MAX_SIZE_TEST", "213", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
                   "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"]
    probe_iters = 1 if tiny else 30  # Detectron2 times iterations after its first 3 (else: wall time)
    report: Dict[str, object] = {"device": device, "batch": batch, "seed": seed, "amp": cuda, "tiny": tiny,
                                 "budget_s": budget_s, "base_lr": 0.02, "data_root": str(data_root)}
    # Probe: the slower (HI-MoE) model, no evaluation, for its seconds per iteration.
    probe = train_net("himoe_probe", work, data_root, common + [
        "SOLVER.MAX_ITER", str(probe_iters), "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "100000", "DATASETS.TEST", "()"], timeout_s=budget_s / 2)
    report["probe"] = probe
    if probe["returncode"] != 0:
        finish(work, report, f"the probe run failed (see {probe['log']})")
    probe.setdefault("s_per_iter", probe["wall_s"] / probe_iters)
    startup_s = max(0.0, probe["wall_s"] - probe_iters * probe["s_per_iter"])
    left = budget_s - (time.perf_counter() - start)
    per_model_train_s = (left / 2 - startup_s - eval_s) * 0.85  # 15 % margin: HI-MoE vs probe noise
    iters = 2 if tiny else int(per_model_train_s / probe["s_per_iter"])
    report.update(startup_s=round(startup_s, 1), iters=iters)
    min_iters = 2 if tiny else 100
    if iters < min_iters:
        finish(work, report, f"{left:.0f}s left allow only {iters} iterations per model: not a comparison")
    steps = sorted({s for s in (int(iters * 0.75), int(iters * 0.9)) if 0 < s < iters})
    schedule = ["SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", str(min(200, iters // 10)),
                "SOLVER.STEPS", "(" + "".join(f"{s}," for s in steps) + ")", "SOLVER.CHECKPOINT_PERIOD", str(iters + 1)]
    report["schedule"] = schedule
    report["models"] = {}
    for model in QUALITY_MODELS:
        deadline = budget_s - (time.perf_counter() - start)
        report["models"][model] = train_net(model, work, data_root, common + schedule, timeout_s=max(10.0, deadline))
        (work / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    missing = [m for m, r in report["models"].items() if r["returncode"] != 0 or not r["bbox"]]
    finish(work, report, f"no COCO AP for {missing}" if missing else None)


def finish(work: Path, report: Dict[str, object], error: Optional[str]) -> None:
    report["error"] = error
    (work / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    sys.exit(f"quality: {error}" if error else 0)


# ----------------------------------------------------------------------------- summary
def junit_counts(path: Path) -> Dict[str, object]:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = [{"name": c.get("name"), "seconds": float(c.get("time", 0)),
              "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")}
             for c in suite.iter("testcase")]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def summary(work: Path, out: Path, meta: List[str]) -> None:
    stages = []
    for line in (work / "stages.tsv").read_text().splitlines():
        name, status, seconds, budget, note = line.split("\t")
        stages.append({"name": name, "status": status, "seconds": int(seconds), "budget_s": int(budget),
                       "note": note, "log": f"logs/{name}.log"})
    result: Dict[str, object] = dict(kv.split("=", 1) for kv in meta)
    result["stages"] = stages
    result["all_passed"] = all(s["status"] in ("passed", "skipped") for s in stages)
    env = work / "environment.json"
    if env.exists():
        result["environment"] = json.loads(env.read_text())
    junit = work / "cuda_tests.xml"
    if junit.exists():
        result["cuda_tests"] = junit_counts(junit)
    benchmarks = {}
    for path in sorted((work / "results").glob("*.json")):
        benchmarks[path.stem] = json.loads(path.read_text())
    result["benchmarks"] = benchmarks
    quality_json = work / "quality" / "quality.json"
    if quality_json.exists():
        result["quality"] = json.loads(quality_json.read_text())
    out.write_text(json.dumps(result, indent=2) + "\n")
    for s in stages:
        print(f"{s['name']:<28} {s['status']:<8} {s['seconds']:>4}s / {s['budget_s']}s  {s['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("environment")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("bench")
    p.add_argument("name", choices=["moe_layer", "detector"])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("quality")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-s", type=float, default=25.0, help="expected seconds of one COCO evaluation")
    p = sub.add_parser("summary")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("meta", nargs="*", help="KEY=VALUE pairs put at the top of the summary")
    args = parser.parse_args()
    if args.command == "environment":
        environment(args.out)
    elif args.command == "bench":
        bench(args.name, args.work, args.tiny, [a for a in args.args if a != "--"])
    elif args.command == "quality":
        quality(args.work, args.data_root, args.device, args.budget_s, args.tiny, args.batch, args.seed, args.eval_s)
    else:
        summary(args.work, args.out, args.meta)


if __name__ == "__main__":
    main()
