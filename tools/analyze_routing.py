#!/usr/bin/env python
"""Where do the experts send what? Routing analysis of a trained HI-MoE detector (both frameworks).

    python tools/analyze_routing.py detectron2 --config-file CFG.yaml --weights model_final.pth \\
        --output-dir output/routing [--dataset aquarium_valid] [KEY VALUE ...]
    python tools/analyze_routing.py mmdet CONFIG.py CHECKPOINT.pth --output-dir output/routing \\
        [--cfg-options k=v ...]

Runs the checkpoint over the test split (Detectron2: --dataset, default DATASETS.TEST[0];
MMDetection: the config's test_dataloader) and records, for every RoI of every MoE layer (DETR
family: every prediction, with its query's routing in the last MoE decoder layer), its
experts and combine weights, the image's scene groups, the matched ground-truth class (IoU >= 0.5,
else background), the COCO object size and the FPN level. Writes to --output-dir:

    routing.csv            tidy table, one row per (image, layer, RoI)
    summary.json           matrices behind the figures, specialization metrics, parameter counts
    figures/<layer>_*.png  class x expert, size x expert, level x expert, scene groups per supercategory
    examples/*.png         --vis-images images with their best predictions coloured by first expert

and prints the specialization metrics (mutual information between class / size / level and the
expert, per-expert class entropy). The Detectron2 datasets aquarium_train/valid and coco128_train
are registered from --data-root (default $HIMOE_DATA_ROOT or ../shared/data); --register NAME JSON
IMAGE_DIR adds any COCO-format dataset.

Works for every HI-MoE family: standard and cascade ROI heads (Detectron2, MMDetection) and DETR
(MMDetection). Dense models and unregistered datasets fail with a clear message before the
checkpoint is loaded; example images without a prediction above --vis-score-thresh say so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm import tqdm

from himoe_plugin.analysis import RoutingAnalysis, format_metrics
from himoe_plugin.analysis.capture import NoMoELayersError, require_moe_layers
from himoe_plugin.core import MoEConfigError, count_parameters


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--max-images", type=int, default=None, help="analyse only the first N images")
    parser.add_argument("--vis-images", type=int, default=4, help="example images to draw")
    parser.add_argument("--vis-max-boxes", type=int, default=20, help="predictions drawn per example image")
    parser.add_argument("--vis-score-thresh", type=float, default=0.0, help="score threshold of drawn predictions")


def finish(analysis: RoutingAnalysis, model: torch.nn.Module, args) -> Dict[str, Path]:
    """Write table, summary (with parameter counts) and figures; print the metrics."""
    count = count_parameters(model)
    paths = analysis.write(args.output_dir, extra={
        "parameters": {"total": count.total, "active_per_instance": count.active, "routed_experts": count.experts}})
    summary = json.loads(paths["summary"].read_text())
    print(format_metrics(summary))
    print(f"parameters: total {count.total / 1e6:.2f} M, active per RoI {count.active / 1e6:.2f} M "
          f"({count.active / count.total:.1%}); routed experts {count.experts / 1e6:.2f} M")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


def report_drawn(path: Path, drawn: int, score_thresh: float) -> None:
    """Say which example image has no prediction drawn (it says so on the image too)."""
    if drawn == 0:
        print(f"{path}: no prediction with score >= {score_thresh} (see the note on the image)")


def run_detectron2(args) -> Dict[str, Path]:
    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model

    from himoe_plugin.detectron2 import SafeDetectionCheckpointer
    from himoe_plugin.detectron2.analysis import (dataset_truths, draw_routed_predictions, new_analysis,
                                                  require_registered_dataset, routed_images)
    from himoe_plugin.detectron2.config import load_tool_cfg
    from himoe_plugin.detectron2.data import register_datasets_from_args

    register_datasets_from_args(args)
    cfg = load_tool_cfg(args.config_file, args.opts)
    dataset = require_registered_dataset(args.dataset or cfg.DATASETS.TEST[0],
                                         "--dataset" if args.dataset else "DATASETS.TEST[0]")
    model = build_model(cfg)
    require_moe_layers(model, args.config_file)
    if args.vis_images and not hasattr(model.roi_heads, "output_routing"):
        sys.exit(f"analyze_routing.py: error: the example images show the routing of the predictions, which "
                 f"{type(model.roi_heads).__name__} does not output (MODEL.HIMOE.OUTPUT_ROUTING): pass --vis-images 0")
    SafeDetectionCheckpointer(model).load(args.weights)
    analysis = new_analysis(model, dataset)
    truths = dataset_truths(dataset)
    examples = args.output_dir / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    num_experts = max(info.num_experts for info in analysis.layers.values())
    total = len(truths) if args.max_images is None else min(len(truths), args.max_images)
    images = routed_images(model, build_detection_test_loader(cfg, dataset), args.max_images)
    for index, (sample, instances, routed) in enumerate(tqdm(images, total=total, desc="routing analysis")):
        analysis.add_image(truths[sample["image_id"]], routed)
        if index < args.vis_images:
            path = examples / f"{Path(sample['file_name']).stem}.png"
            report_drawn(path, draw_routed_predictions(sample, instances, dataset, num_experts, path,
                                                       args.vis_max_boxes, args.vis_score_thresh),
                         args.vis_score_thresh)
    return finish(analysis, model, args)


def run_mmdet(args) -> Dict[str, Path]:
    from mmdet.registry import MODELS
    from mmengine.config import Config, DictAction
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner, load_checkpoint

    import himoe_plugin.mmdet  # noqa: F401  (registers the modules)
    from himoe_plugin.mmdet.analysis import dataset_truths, draw_routed_predictions, new_analysis, routed_images

    cfg = Config.fromfile(args.config)
    if args.cfg_options:  # parsed like mmdet's tools parse them
        options = argparse.ArgumentParser()
        options.add_argument("--cfg-options", nargs="+", action=DictAction)
        cfg.merge_from_dict(options.parse_args(["--cfg-options", *args.cfg_options]).cfg_options)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    cfg.test_dataloader.update(batch_size=1, num_workers=0, persistent_workers=False)
    model = MODELS.build(cfg.model)
    require_moe_layers(model, args.config)
    load_checkpoint(model, args.checkpoint, map_location="cpu")
    if torch.cuda.is_available():
        model = model.cuda()
    loader = Runner.build_dataloader(cfg.test_dataloader)
    analysis = new_analysis(model, loader.dataset)
    truths = dataset_truths(loader.dataset)
    classes = loader.dataset.metainfo["classes"]
    examples = args.output_dir / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    num_experts = max(info.num_experts for info in analysis.layers.values())
    total = len(truths) if args.max_images is None else min(len(truths), args.max_images)
    for index, (sample, routed) in enumerate(tqdm(routed_images(model, loader, args.max_images), total=total,
                                                  desc="routing analysis")):
        analysis.add_image(truths[sample.img_id], routed)
        if index < args.vis_images:
            path = examples / f"{Path(sample.img_path).stem}.png"
            report_drawn(path, draw_routed_predictions(sample, classes, num_experts, path, args.vis_max_boxes,
                                                       args.vis_score_thresh), args.vis_score_thresh)
    return finish(analysis, model, args)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    frameworks = parser.add_subparsers(dest="framework", required=True)
    d2 = frameworks.add_parser("detectron2", help="a Detectron2 yaml config and checkpoint")
    d2.add_argument("--config-file", required=True)
    d2.add_argument("--weights", required=True, help="checkpoint (MODEL.WEIGHTS)")
    d2.add_argument("--dataset", default="", help="registered dataset (default: DATASETS.TEST[0])")
    d2.add_argument("--data-root", default="", help="folder of the bundled COCO-format datasets")
    d2.add_argument("--register", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                    help="register another COCO-format dataset (repeatable)")
    add_common_arguments(d2)
    d2.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    mm = frameworks.add_parser("mmdet", help="an MMDetection config and checkpoint")
    mm.add_argument("config")
    mm.add_argument("checkpoint")
    add_common_arguments(mm)
    mm.add_argument("--cfg-options", nargs="+", default=[], help="config overrides key=value (as in mmdet's tools)")
    return parser


def main(argv: Optional[list] = None) -> Dict[str, Path]:
    args = argument_parser().parse_args(argv)
    try:
        return run_detectron2(args) if args.framework == "detectron2" else run_mmdet(args)
    except (NoMoELayersError, MoEConfigError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.exit(f"analyze_routing.py: error: {message}")


if __name__ == "__main__":
    main(sys.argv[1:])
