#!/usr/bin/env python
"""Run a trained HI-MoE detector on your own images and write them with the predictions drawn in
the colour of the expert each box was routed to (label: class, expert, its weight).

    python tools/demo_routing.py detectron2 --config-file CFG.yaml --weights model_final.pth \\
        --input img1.jpg img2.jpg --output-dir output/demo [--dataset aquarium_train] [KEY VALUE ...]
    python tools/demo_routing.py mmdet CONFIG.py CHECKPOINT.pth --input img1.jpg --output-dir output/demo

Detectron2: ``DefaultPredictor`` with ``MODEL.HIMOE.OUTPUT_ROUTING True``; the class names come
from the metadata of --dataset (default DATASETS.TEST[0]; the bundled datasets are registered).
MMDetection: ``DetInferencer`` with ``model.test_cfg.rcnn.output_routing=True``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List


def run_detectron2(args) -> List[Path]:
    import torch
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    from himoe_plugin.detectron2 import get_himoe_cfg, register_bundled_datasets
    from himoe_plugin.detectron2.analysis import draw_routed_predictions
    from himoe_plugin.detectron2.data import default_data_root

    if os.path.isdir(default_data_root()):
        register_bundled_datasets(str(default_data_root()))
    cfg = get_himoe_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list([*args.opts, "MODEL.WEIGHTS", args.weights, "MODEL.HIMOE.OUTPUT_ROUTING", "True"])
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    num_experts = predictor.model.roi_heads.box_head.moe_config.num_experts
    written = []
    for image in args.input:
        instances = predictor(read_image(image, format=cfg.INPUT.FORMAT))["instances"].to("cpu")
        written.append(draw_routed_predictions(
            {"file_name": image}, instances, args.dataset or cfg.DATASETS.TEST[0], num_experts,
            args.output_dir / f"{Path(image).stem}.png", args.max_boxes, args.score_thresh))
    return written


def run_mmdet(args) -> List[Path]:
    from mmdet.apis import DetInferencer
    from mmengine.config import Config

    import himoe_plugin.mmdet  # noqa: F401  (registers the modules)
    from himoe_plugin.mmdet.analysis import draw_routed_predictions

    cfg = Config.fromfile(args.config)
    cfg.model.test_cfg.rcnn.output_routing = True
    inferencer = DetInferencer(model=cfg, weights=args.checkpoint, device=args.device, show_progress=False)
    num_experts = inferencer.model.roi_head.bbox_head.moe_config.num_experts
    classes = inferencer.model.dataset_meta["classes"]
    written = []
    for image in args.input:
        sample = inferencer(image, return_datasamples=True)["predictions"][0]
        written.append(draw_routed_predictions(sample, classes, num_experts, args.output_dir / f"{Path(image).stem}.png",
                                               args.max_boxes, args.score_thresh))
    return written


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    frameworks = parser.add_subparsers(dest="framework", required=True)
    d2 = frameworks.add_parser("detectron2")
    d2.add_argument("--config-file", required=True)
    d2.add_argument("--weights", required=True)
    d2.add_argument("--dataset", default="", help="registered dataset whose class names to show")
    mm = frameworks.add_parser("mmdet")
    mm.add_argument("config")
    mm.add_argument("checkpoint")
    mm.add_argument("--device", default="cuda" if _cuda() else "cpu")
    for sub in (d2, mm):
        sub.add_argument("--input", nargs="+", required=True, help="image files")
        sub.add_argument("--output-dir", required=True, type=Path)
        sub.add_argument("--max-boxes", type=int, default=20, help="best predictions drawn per image")
        sub.add_argument("--score-thresh", type=float, default=0.3)
    d2.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> List[Path]:
    args = argument_parser().parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = run_detectron2(args) if args.framework == "detectron2" else run_mmdet(args)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
