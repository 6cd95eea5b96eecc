"""HI-MoE box head vs the stock dense box head on identical RoI features (side by side).

    python benchmarks/roi_head.py              # Detectron2 and MMDetection, ~3 min on 2 cores
    python benchmarks/roi_head.py --quick
    python benchmarks/roi_head.py --device cuda

Shapes: training = 512 sampled RoIs x 2 images (forward + backward of box head and predictor);
inference = 1000 proposals x 2 images (no-grad forward). HI-MoE: 8 experts in 4 groups, scene
keeps 2 groups, k in {1, 2}, shared expert off/on; every expert is the fc6+fc7 block.
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Tuple

import torch
from tqdm import tqdm

from timing import add_device_argument, compare, fmt_ratio, ratio_summary, write_results

NUM_IMAGES = 2
SHAPES = {"train": 512, "infer": 1000}  # RoIs per image
VARIANTS = [(1, False), (2, False), (1, True), (2, True)]  # (k, shared)
NUM_CLASSES = 80


def detectron2_heads(top_k: int, shared: bool) -> Tuple[Callable, Callable, List[torch.nn.Module]]:
    """(dense, himoe, modules): callables (RoI features (N, 256, 7, 7), image_index, scene) ->
    predictor outputs, and the modules they use."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers

    from himoe_plugin.core import MoEConfig
    from himoe_plugin.detectron2 import MoEConvFCBoxHead

    shape = ShapeSpec(channels=256, height=7, width=7)
    torch.manual_seed(0)
    dense_head = FastRCNNConvFCHead(shape, conv_dims=[], fc_dims=[1024, 1024])
    moe_head = MoEConvFCBoxHead(
        shape, conv_dims=[], fc_dims=[1024, 1024],
        moe_config=MoEConfig(num_experts=8, top_k=top_k, num_groups=4, scene_top_k=2, shared_expert=shared),
    )
    predictors = [
        FastRCNNOutputLayers(ShapeSpec(channels=1024), box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
                             num_classes=NUM_CLASSES)
        for _ in range(2)
    ]

    def dense(features, image_index, scene):
        return predictors[0](dense_head(features))

    def himoe(features, image_index, scene):
        box_features, routing = moe_head(features, scene, image_index)
        scores, deltas = predictors[1](box_features)
        return scores + sum(routing.losses.values()) if moe_head.training else scores, deltas

    modules = [dense_head, moe_head, *predictors]
    return dense, himoe, modules


def mmdet_heads(top_k: int, shared: bool):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import himoe_plugin.mmdet  # noqa: F401  (registers the HI-MoE components)

    register_all_modules()
    torch.manual_seed(0)
    common = dict(in_channels=256, fc_out_channels=1024, roi_feat_size=7, num_classes=NUM_CLASSES)
    dense_head = MODELS.build(dict(type="Shared2FCBBoxHead", **common))
    moe_head = MODELS.build(dict(
        type="MoEShared2FCBBoxHead", **common, shared_expert=shared,
        router=dict(type="HierarchicalRouter", num_experts=8, top_k=top_k, num_groups=4, scene_top_k=2),
    ))
    dense_head.init_weights()
    moe_head.init_weights()

    def dense(features, image_index, scene):
        return dense_head(features)

    def himoe(features, image_index, scene):
        cls_score, bbox_pred, routing = moe_head(features, scene, image_index)
        aux = sum(moe_head.routing_losses(routing).values())
        return cls_score + aux if moe_head.training else cls_score, bbox_pred

    return dense, himoe, [dense_head, moe_head]


FRAMEWORKS = {"detectron2": detectron2_heads, "mmdet": mmdet_heads}


def contenders(framework: str, top_k: int, shared: bool, phase: str, device: torch.device
               ) -> Dict[str, Callable[[], object]]:
    dense, himoe, modules = FRAMEWORKS[framework](top_k, shared)
    train = phase == "train"
    for module in modules:
        module.train(train).to(device)
    n = SHAPES[phase] * NUM_IMAGES
    features = torch.relu(torch.randn(n, 256, 7, 7, device=device))
    image_index = torch.arange(n, device=device) * NUM_IMAGES // n
    scene = torch.randn(NUM_IMAGES, 256, device=device)

    def wrap(fn):
        def run():
            if train:
                for module in modules:
                    module.zero_grad(set_to_none=True)  # as optimizer.zero_grad() does
                outputs = fn(features, image_index, scene)
                sum(o.float().sum() for o in outputs).backward()
            else:
                with torch.no_grad():
                    fn(features, image_index, scene)
        return run

    return {"dense": wrap(dense), "himoe": wrap(himoe)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS))
    add_device_argument(parser)
    args = parser.parse_args()
    variants = VARIANTS[:2] if args.quick else VARIANTS
    repeats = 3 if args.quick else args.repeats
    jobs = [(f, k, s, p) for f in args.frameworks for k, s in variants for p in ("train", "infer")]
    results: List[dict] = []
    for framework, top_k, shared, phase in tqdm(jobs, desc="ROI head configs"):
        seconds = compare(contenders(framework, top_k, shared, phase, args.device), repeats=repeats, device=args.device)
        results.append(dict(framework=framework, k=top_k, shared=shared, phase=phase,
                            rois=SHAPES[phase] * NUM_IMAGES, target=1.10 * (top_k + shared),
                            summary=ratio_summary(seconds, "dense"), seconds=seconds))
    lines = [
        "| framework | k | shared | phase | RoIs | dense ms | HI-MoE / dense | (k + shared) x 1.10 |",
        "|---|---:|:---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['framework']} | {r['k']} | {'on' if r['shared'] else 'off'} | {r['phase']} | {r['rois']} "
                     f"| {1000 * s['dense']['median_s']:.1f} | {fmt_ratio(s['himoe'])} | {r['target']:.2f} |")
    path = write_results("roi_head", {"repeats": repeats, "results": results}, lines, args.device)
    print("\n".join(lines))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
