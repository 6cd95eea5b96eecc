"""HI-MoE Cascade R-CNN R50-FPN vs the dense Cascade R-CNN, with and without route-once reuse.

    python benchmarks/cascade.py                         # both frameworks, short side 512, 7 repeats
    python benchmarks/cascade.py --frameworks detectron2 --size 800 --repeats 9
    python benchmarks/cascade.py --timer cpu --threads 1    # CPU time, on a machine shared with other jobs

For each framework: the stock dense Cascade R-CNN R50-FPN (boxes only: Detectron2's
``Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml`` with ``MASK_ON: False``, mmdet's
``cascade-rcnn_r50_fpn_1x_coco.py``) and the HI-MoE cascade of ``configs/`` (every stage has its
own 8 experts in 4 groups, the scene keeps 2 groups) at k=1 and k=2, each stage routing its RoIs
(``route_once`` off), reusing stage 0's scene subsets (``scene``), or reusing stage 0's whole
routing (``instance``: later stages run no router and reuse stage 0's dispatch plan at
inference). All built with the same seed (identical backbone, RPN and proposals) on real
Aquarium images, BN statistics calibrated on them. Measured in one process, every HI-MoE
variant alternating with the dense model (one variant in memory at a time: three R50 box heads
with 8 experts each, plus optimizer state, are ~4.5 GB): inference latency (1 image, 1000
proposals, three stages) and training-step time (2 images, forward, backward, SGD step). Also total vs active parameters and the MACs counted by the
frameworks' FLOP tools for what was dispatched. Random weights, trainable BN. The later stages of
mmdet's cascade sample without adding ground-truth boxes as proposals in every variant (what
``route_once='instance'`` needs; Detectron2's cascade never adds them after stage 0).
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from detector import (MMDET_BODY, REPO_ROOT, calibrate_batch_norm, check_identical_trunks, data_root,
                      mmdet_macs_by_module)
from timing import (RESULTS_DIR, add_timer_arguments, apply_timer_arguments, compare, fmt_ratio, ratio_summary,
                    write_results)

#: name -> (top_k, route_once); None: the dense cascade.
VARIANTS: Dict[str, Optional[Tuple[int, str]]] = {
    "dense": None,
    "k1": (1, ""),
    "k1_scene": (1, "scene"),
    "k1_instance": (1, "instance"),
    "k2": (2, ""),
    "k2_instance": (2, "instance"),
}


@dataclass
class Contender:
    """One built model and what the benchmark runs on it."""

    model: torch.nn.Module
    infer: Callable[[], None]
    train: Callable[[], None]
    info: Dict[str, object]
    trunk: Tuple[str, ...]  # parameter prefixes that must equal the dense model's


def model_info(model: torch.nn.Module, gmacs: float, box_head_gmacs: float) -> Dict[str, object]:
    from himoe_plugin.core import count_parameters

    count = count_parameters(model)
    return dict(params=dict(total=count.total, active=count.active), gmacs=gmacs, box_head_gmacs=box_head_gmacs)


# ----------------------------------------------------------------------------- Detectron2
def detectron2_builder(size: int) -> Callable[[str, bool], Contender]:
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data import transforms as T
    from detectron2.model_zoo import get_config_file
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.analysis import FlopCountAnalysis
    from detectron2.utils.events import EventStorage

    from himoe_plugin.detectron2 import get_himoe_cfg, register_bundled_datasets

    register_bundled_datasets(str(data_root()))
    common = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.MASK_ON", "False", "MODEL.RESNETS.NORM", "BN",
              "MODEL.BACKBONE.FREEZE_AT", "0", "INPUT.MIN_SIZE_TEST", str(size), "SOLVER.BASE_LR", "0.001"]

    def cfg_of(variant):
        cfg = get_himoe_cfg()
        if variant is None:
            cfg.merge_from_file(get_config_file("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"))
            cfg.merge_from_list(common)
        else:
            cfg.merge_from_file(str(REPO_ROOT / "configs/detectron2/himoe_cascade_mask_rcnn_R_50_FPN_1x.yaml"))
            cfg.merge_from_list(common + ["MODEL.HIMOE.TOP_K", str(variant[0]), "MODEL.HIMOE.ROUTE_ONCE", variant[1]])
        return cfg

    mapper = DatasetMapper(cfg_of(None), is_train=True, augmentations=[T.ResizeShortestEdge(size, 1333)])
    dicts = DatasetCatalog.get("aquarium_valid")[:2]
    train_batch = [mapper(d) for d in dicts]
    infer_batch = [{"image": train_batch[0]["image"], "height": dicts[0]["height"], "width": dicts[0]["width"]}]

    def build(name: str, analyze: bool) -> Contender:
        cfg = cfg_of(VARIANTS[name])
        torch.manual_seed(0)
        model = build_model(cfg)
        calibrate_batch_norm(model, lambda: model.backbone(model.preprocess_image(train_batch).tensor))
        optimizer = build_optimizer(cfg, model)

        def run_infer():
            model.eval()
            with torch.no_grad():
                model(infer_batch)

        def run_train():
            model.train()
            with EventStorage(0):
                losses = model(train_batch)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # no gradients held while the other model runs

        info = {}
        if analyze:
            flops = FlopCountAnalysis(model.eval(), infer_batch)
            flops.unsupported_ops_warnings(False)
            flops.uncalled_modules_warnings(False)
            by_module = flops.by_module()
            info = model_info(model, by_module[""] / 1e9, by_module["model.roi_heads.box_head"] / 1e9)
        return Contender(model, run_infer, run_train, info, ("backbone.", "proposal_generator."))

    return build


# ----------------------------------------------------------------------------- MMDetection
def mmdet_builder(size: int) -> Callable[[str, bool], Contender]:
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    import himoe_plugin.mmdet  # noqa: F401
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    tmp = Path(tempfile.mkdtemp())

    def cfg_of(name: str) -> Config:
        variant = VARIANTS[name]
        base = ("mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py" if variant is None
                else str(REPO_ROOT / "configs/mmdet/himoe-cascade-rcnn_r50_fpn_1x_coco.py"))
        path = tmp / f"{name}.py"
        path.write_text(f"_base_ = {base!r}\n" + MMDET_BODY.format(
            size=size, data_root=str(data_root() / "aquarium") + "/"))
        cfg = Config.fromfile(str(path))
        for stage_cfg in cfg.model.train_cfg.rcnn[1:]:
            stage_cfg.sampler.add_gt_as_proposals = False
        if variant is not None:
            cfg.model.roi_head.moe_bbox_head.router.top_k = variant[0]
            cfg.model.roi_head.route_once = variant[1] or None
        return cfg

    dense_cfg = cfg_of("dense")
    train_batch = next(iter(Runner.build_dataloader(dense_cfg.train_dataloader)))
    infer_batch = next(iter(Runner.build_dataloader(dense_cfg.val_dataloader)))

    def build(name: str, analyze: bool) -> Contender:
        cfg = cfg_of(name)
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        torch.manual_seed(0)  # the experts drew random numbers: the trunk's init must not differ
        model.init_weights()
        calibrate_batch_norm(model, lambda: model.extract_feat(
            model.data_preprocessor(train_batch, True)["inputs"]))
        optim = build_optim_wrapper(model, dict(optimizer=dict(type="SGD", lr=0.001, momentum=0.9)))

        def run_infer():
            model.eval()
            with torch.no_grad():
                model.test_step(infer_batch)

        def run_train():
            model.train()
            model.train_step(train_batch, optim)  # zeroes the gradients after its step

        info = {}
        if analyze:
            by_module = mmdet_macs_by_module(model, infer_batch)
            info = model_info(model, by_module[""] / 1e9, by_module["roi_head.bbox_head"] / 1e9)
        return Contender(model, run_infer, run_train, info, ("backbone.", "neck.", "rpn_head."))

    return build


FRAMEWORKS: Dict[str, Callable[[int], Callable[[str, bool], Contender]]] = {
    "detectron2": detectron2_builder, "mmdet": mmdet_builder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="short side of the input images")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS))
    parser.add_argument("--variants", nargs="+", default=[n for n in VARIANTS if n != "dense"],
                        choices=[n for n in VARIANTS if n != "dense"])
    add_timer_arguments(parser)
    args = parser.parse_args()
    args.device = torch.device("cpu")
    apply_timer_arguments(args)

    himoe = args.variants
    results: List[dict] = []
    for framework in args.frameworks:
        build = FRAMEWORKS[framework](args.size)
        info = {"dense": build("dense", True).info}
        summaries: Dict[str, Dict[str, dict]] = {"infer": {}, "train": {}}
        seconds: Dict[str, Dict[str, dict]] = {"infer": {}, "train": {}}
        # One HI-MoE variant at a time next to a fresh dense model (three R50 box heads with 8
        # experts each and their optimizer state: all at once would not fit in memory).
        for name in tqdm(himoe, desc=framework):
            dense, variant = build("dense", False), build(name, True)
            check_identical_trunks({"dense": dense.model, name: variant.model}, dense.trunk)
            info[name] = variant.info
            for phase in ("infer", "train"):
                pair = {"dense": getattr(dense, phase), name: getattr(variant, phase)}
                measured = compare(pair, repeats=args.repeats, timer=args.timer)
                summary = ratio_summary(measured, "dense")
                summaries[phase][name] = summary[name]
                summaries[phase].setdefault("dense", summary["dense"])  # seconds of the first pair
                seconds[phase][name] = measured
            del dense, variant
            gc.collect()
        for phase in ("infer", "train"):
            results.append(dict(framework=framework, phase=phase, info=info, summary=summaries[phase],
                                seconds=seconds[phase]))
        report(args, results)  # after every framework: a later failure keeps what was measured


def report(args: argparse.Namespace, results: List[dict]) -> None:
    """Write ``results/cascade.{json,md}`` (keeping the results of the other frameworks from an
    earlier run at the same size and repeats) and print the tables."""
    previous = RESULTS_DIR / "cascade.json"
    if previous.is_file():
        earlier = json.loads(previous.read_text())
        if (earlier["size"], earlier["repeats"]) == (args.size, args.repeats):
            measured = {r["framework"] for r in results}
            results = [r for r in earlier["results"] if r["framework"] not in measured] + results
    himoe = [name for name in VARIANTS if any(name in r["summary"] for r in results) and name != "dense"]
    lines = [f"Input: short side {args.size}; {args.timer} time, {torch.get_num_threads()} thread(s); "
             f"median of {args.repeats} alternating repeats of each "
             "variant next to a fresh dense cascade; ratio = per-repeat time / dense (median, "
             "min-max). Target: k1_instance inference <= 1.05.", "",
             "| framework | phase | dense s | " + " | ".join(f"{n} / dense" for n in himoe) + " |",
             "|---|---|---:|" + "---:|" * len(himoe)]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['framework']} | {r['phase']} | {s['dense']['median_s']:.2f} | "
                     + " | ".join(fmt_ratio(s[n]) if n in s else "-" for n in himoe) + " |")
    lines += ["", "| framework | model | params total (M) | params active (M) | GMACs (1 image) | box heads GMACs |",
              "|---|---|---:|---:|---:|---:|"]
    for r in results:
        if r["phase"] != "infer":
            continue
        for name, i in r["info"].items():
            lines.append(f"| {r['framework']} | {name} | {i['params']['total'] / 1e6:.1f} | "
                         f"{i['params']['active'] / 1e6:.1f} | {i['gmacs']:.1f} | {i['box_head_gmacs']:.2f} |")
    path = write_results("cascade", {"size": args.size, "repeats": args.repeats, "timer": args.timer,
                                     "results": results}, lines)
    print("\n".join(lines))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
