"""End-to-end HI-MoE Faster R-CNN R50-FPN vs the dense one, both frameworks, side by side.

    python benchmarks/detector.py                    # short side 512, ~7 min on 2 CPU cores
    python benchmarks/detector.py --size 800 --frameworks detectron2
    python benchmarks/detector.py --device cuda

For each framework: the stock dense Faster R-CNN R50-FPN and HI-MoE (8 experts in 4 groups,
scene keeps 2 groups) at k=1 and k=2, built with the same seed (identical backbone, RPN and
proposals), on real Aquarium images at the same input size; BN statistics calibrated on them. Measured in one process, alternating:
inference latency (1 image, 1000 proposals) and training-step time (2 images, forward, backward,
SGD step). Also total vs active parameters (active: what one RoI uses) and the MACs counted by
the frameworks' own FLOP tools (fvcore for Detectron2, mmengine's analyzer for MMDetection) for
what was actually dispatched. Random weights (no pretrained weights here); trainable BN.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

from timing import add_device_argument, compare, fmt_ratio, ratio_summary, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"dense": None, "himoe_k1": 1, "himoe_k2": 2}


def data_root() -> Path:
    root = Path(os.environ.get("HIMOE_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "aquarium").is_dir():
        raise SystemExit(f"bundled data not found at {root} (set HIMOE_DATA_ROOT)")
    return root


@torch.no_grad()
def calibrate_batch_norm(model: torch.nn.Module, run_forward: Callable[[], object]) -> None:
    """Set BN running statistics from the benchmark images (cumulative average of 3 passes).

    Random init without this makes eval-mode activations explode through the deep backbone, so
    the RPN proposes a handful of full-image boxes instead of ~1000 realistic proposals.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for _ in range(3):
        run_forward()
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def check_identical_trunks(models: Dict[str, torch.nn.Module], prefixes: tuple) -> None:
    """Fail unless every model has the same backbone / neck / RPN weights (hence proposals).

    RoIAlign with adaptive sampling costs in proportion to the RoI areas, so models that
    proposed different boxes would not be compared on the same work.
    """
    reference_name, reference = next(iter(models.items()))
    expected = {k: v for k, v in reference.state_dict().items() if k.startswith(prefixes)}
    for name, model in models.items():
        state = model.state_dict()
        differing = [k for k, v in expected.items() if not torch.equal(v, state[k])]
        if differing:
            raise RuntimeError(f"{name} and {reference_name} differ outside the RoI head: {differing[:3]}")


def parameter_counts(model: torch.nn.Module, experts: torch.nn.Module, top_k: int) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    if experts is None:
        return {"total": total, "active": total}
    expert_params = sum(p.numel() for p in experts.parameters())
    num_experts = experts.num_experts
    return {"total": total, "active": total - expert_params * (num_experts - top_k) // num_experts}


# ----------------------------------------------------------------------------- Detectron2
def mmdet_macs_by_module(model: torch.nn.Module, batch: dict) -> Dict[str, int]:
    """Multiply-adds of one inference pass of an mmdet detector per module name ('' = all), as
    mmengine's ``FlopAnalyzer`` (what ``get_flops.py`` uses) counts them."""
    from mmengine.analysis import FlopAnalyzer

    model.eval()
    data = model.data_preprocessor(batch, False)
    forward = model.forward
    model.forward = partial(forward, data_samples=data["data_samples"])
    try:
        analyzer = FlopAnalyzer(model, inputs=data["inputs"])
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        return analyzer.by_module()
    finally:
        model.forward = forward


def detectron2_models(size: int, device: torch.device):
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.analysis import FlopCountAnalysis
    from detectron2.utils.events import EventStorage

    from himoe_plugin.detectron2 import get_himoe_cfg, register_bundled_datasets

    register_bundled_datasets(str(data_root()))
    common = ["MODEL.DEVICE", str(device), "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", "BN",
              "MODEL.BACKBONE.FREEZE_AT", "0", "INPUT.MIN_SIZE_TEST", str(size), "SOLVER.BASE_LR", "0.001"]

    def cfg_of(top_k):
        cfg = get_himoe_cfg()
        name = "himoe_faster_rcnn_R_50_FPN_1x.yaml" if top_k else None
        cfg.merge_from_file(str(REPO_ROOT / "configs/detectron2" / name) if name else
                            _zoo_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
        cfg.merge_from_list(common + (["MODEL.HIMOE.TOP_K", str(top_k)] if top_k else []))
        return cfg

    cfgs = {name: cfg_of(k) for name, k in VARIANTS.items()}
    mapper = DatasetMapper(cfgs["dense"], is_train=True,
                           augmentations=[T.ResizeShortestEdge(size, 1333)])
    dicts = DatasetCatalog.get("aquarium_valid")[:2]
    train_batch = [mapper(d) for d in dicts]
    infer_batch = [{"image": train_batch[0]["image"], "height": dicts[0]["height"], "width": dicts[0]["width"]}]

    infer, train, info, models = {}, {}, {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = models[name] = build_model(cfg)
        calibrate_batch_norm(model, lambda model=model: model.backbone(model.preprocess_image(train_batch).tensor))
        optimizer = build_optimizer(cfg, model)

        def run_infer(model=model):
            model.eval()
            with torch.no_grad():
                model(infer_batch)

        def run_train(model=model, optimizer=optimizer):
            model.train()
            with EventStorage(0):
                losses = model(train_batch)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()

        infer[name], train[name] = run_infer, run_train
        head = model.roi_heads.box_head
        experts = head.moe_block.moe.experts if hasattr(head, "moe_block") else None
        flops = FlopCountAnalysis(model.eval(), infer_batch)
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        by_module = flops.by_module()
        info[name] = dict(params=parameter_counts(model, experts, VARIANTS[name] or 1),
                          gmacs=by_module[""] / 1e9,
                          box_head_gmacs=by_module["model.roi_heads.box_head"] / 1e9)
    check_identical_trunks(models, ("backbone.", "proposal_generator."))
    return infer, train, info


def _zoo_file(path: str) -> str:
    from detectron2.model_zoo import get_config_file

    return get_config_file(path)


# ----------------------------------------------------------------------------- MMDetection
MMDET_BODY = """
custom_imports = dict(imports=['himoe_plugin.mmdet'], allow_failed_imports=False)
model = dict(backbone=dict(init_cfg=None, frozen_stages=-1, norm_eval=False,
                           norm_cfg=dict(type='BN', requires_grad=True)))
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(1333, {size}), keep_ratio=True), dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=(1333, {size}), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
aquarium = dict(data_root={data_root!r}, ann_file='annotations/instances_valid.json',
                data_prefix=dict(img='images/valid/'),
                metainfo=dict(classes=('fish', 'jellyfish', 'penguin', 'puffin', 'shark', 'starfish',
                                       'stingray')))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, sampler=dict(shuffle=False),
                        dataset=dict(pipeline=train_pipeline, **aquarium))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(pipeline=test_pipeline, **aquarium))
"""


def mmdet_models(size: int, device: torch.device):
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    import himoe_plugin.mmdet  # noqa: F401
    from mmdet.registry import MODELS

    init_default_scope("mmdet")
    bases = {
        "dense": "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
        "himoe_k1": str(REPO_ROOT / "configs/mmdet/himoe-faster-rcnn_r50_fpn_1x_coco.py"),
        "himoe_k2": str(REPO_ROOT / "configs/mmdet/himoe-faster-rcnn_r50_fpn_1x_coco.py"),
    }
    tmp = Path(tempfile.mkdtemp())
    infer, train, info, models = {}, {}, {}, {}
    train_batch = infer_batch = None
    for name, base in bases.items():
        body = MMDET_BODY.format(size=size, data_root=str(data_root() / "aquarium") + "/")
        if VARIANTS[name]:
            body += f"model.update(roi_head=dict(bbox_head=dict(router=dict(top_k={VARIANTS[name]}))))\n"
        path = tmp / f"{name}.py"
        path.write_text(f"_base_ = {base!r}\n{body}")
        cfg = Config.fromfile(str(path))
        if train_batch is None:
            train_batch = next(iter(Runner.build_dataloader(cfg.train_dataloader)))
            infer_batch = next(iter(Runner.build_dataloader(cfg.val_dataloader)))
        torch.manual_seed(0)
        model = models[name] = MODELS.build(cfg.model)
        # Building the experts draws random numbers, so reseed: the trunk's init_weights must
        # draw the same ones in every variant.
        torch.manual_seed(0)
        model.init_weights()
        model.to(device)
        calibrate_batch_norm(model, lambda model=model: model.extract_feat(
            model.data_preprocessor(train_batch, True)["inputs"]))
        optim = build_optim_wrapper(model, dict(optimizer=dict(type="SGD", lr=0.001, momentum=0.9)))

        def run_infer(model=model):
            model.eval()
            with torch.no_grad():
                model.test_step(infer_batch)

        def run_train(model=model, optim=optim):
            model.train()
            model.train_step(train_batch, optim)

        infer[name], train[name] = run_infer, run_train
        by_module = mmdet_macs_by_module(model, infer_batch)
        head = model.roi_head.bbox_head
        experts = head.moe_block.moe.experts if hasattr(head, "moe_block") else None
        info[name] = dict(params=parameter_counts(model, experts, VARIANTS[name] or 1),
                          gmacs=by_module[""] / 1e9,
                          box_head_gmacs=by_module["roi_head.bbox_head"] / 1e9)
    check_identical_trunks(models, ("backbone.", "neck.", "rpn_head."))
    return infer, train, info


FRAMEWORKS: Dict[str, Callable] = {"detectron2": detectron2_models, "mmdet": mmdet_models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="short side of the input images")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS))
    add_device_argument(parser)
    args = parser.parse_args()

    results: List[dict] = []
    for framework in tqdm(args.frameworks, desc="frameworks"):
        infer, train, info = FRAMEWORKS[framework](args.size, args.device)
        for phase, contenders in (("infer", infer), ("train", train)):
            seconds = compare(contenders, repeats=args.repeats, device=args.device)
            results.append(dict(framework=framework, phase=phase, info=info,
                                summary=ratio_summary(seconds, "dense"), seconds=seconds))

    lines = [f"Input: short side {args.size}; median of {args.repeats} alternating repeats; "
             "ratio = per-repeat time / dense (median, min-max).", "",
             "| framework | phase | dense s | HI-MoE k=1 / dense | target | HI-MoE k=2 / dense |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        s = r["summary"]
        target = "<= 1.05" if r["phase"] == "infer" else "<= 1.10"
        lines.append(f"| {r['framework']} | {r['phase']} | {s['dense']['median_s']:.2f} | "
                     f"{fmt_ratio(s['himoe_k1'])} | {target} | {fmt_ratio(s['himoe_k2'])} |")
    lines += ["", "| framework | model | params total (M) | params active (M) | GMACs (1 image) | box head GMACs |",
              "|---|---|---:|---:|---:|---:|"]
    for r in results:
        if r["phase"] != "infer":
            continue
        for name, i in r["info"].items():
            lines.append(f"| {r['framework']} | {name} | {i['params']['total'] / 1e6:.1f} | "
                         f"{i['params']['active'] / 1e6:.1f} | {i['gmacs']:.1f} | {i['box_head_gmacs']:.2f} |")
    path = write_results("detector", {"size": args.size, "repeats": args.repeats, "results": results}, lines,
                         args.device)
    print("\n".join(lines))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
