#!/usr/bin/env python
"""Run a trained HI-MoE detector on your own images and write them with the predictions drawn in
the colour of the expert each box was routed to (label ``<class> | expert <e> (w <weight>)``: the
first expert and its combine weight, not a confidence), with a legend of the expert colours.

    python tools/demo_routing.py detectron2 --config-file CFG.yaml --weights model_final.pth \\
        --input img1.jpg img2.jpg --output-dir output/demo [--dataset aquarium_train] [KEY VALUE ...]
    python tools/demo_routing.py mmdet CONFIG.py CHECKPOINT.pth --input img1.jpg --output-dir output/demo

Detectron2: ``DefaultPredictor`` with ``MODEL.HIMOE.OUTPUT_ROUTING True`` (the config loaded and
checked as ``tools/train_net.py`` does, the weights with ``SafeDetectionCheckpointer``); the class
names come from the metadata of --dataset (default DATASETS.TEST[0]; the bundled datasets are
registered). MMDetection: ``DetInferencer`` with ``test_cfg.rcnn.output_routing=True`` (RoI heads,
standard or cascade) or ``test_cfg.output_routing=True`` (DETR family). An image on which no
prediction reaches --score-thresh is written with a note saying so, and the tool prints it. Dense
models and unregistered datasets fail before any weights are loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from himoe_plugin.analysis.capture import NoMoELayersError, layer_infos, require_moe_layers
from himoe_plugin.core import MoEConfigError


def report(path: Path, drawn: int, score_thresh: float) -> Path:
    print(path if drawn else f"{path}: no prediction with score >= {score_thresh} (see the note on the image)")
    return path


def run_detectron2(args) -> List[Path]:
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    from himoe_plugin.detectron2 import SafeDetectionCheckpointer
    from himoe_plugin.detectron2.analysis import draw_routed_predictions, require_registered_dataset
    from himoe_plugin.detectron2.config import load_tool_cfg
    from himoe_plugin.detectron2.data import register_datasets_from_args

    register_datasets_from_args(args)
    # No MODEL.WEIGHTS for DefaultPredictor (its plain checkpointer): the safe one loads them below.
    cfg = load_tool_cfg(args.config_file, [*args.opts, "MODEL.HIMOE.OUTPUT_ROUTING", "True", "MODEL.WEIGHTS", ""])
    dataset = require_registered_dataset(args.dataset or cfg.DATASETS.TEST[0],
                                         "--dataset" if args.dataset else "DATASETS.TEST[0]")
    predictor = DefaultPredictor(cfg)
    require_moe_layers(predictor.model, args.config_file)
    SafeDetectionCheckpointer(predictor.model).load(args.weights)
    num_experts = max(info.num_experts for info in layer_infos(predictor.model).values())
    written = []
    for image in args.input:
        instances = predictor(read_image(image, format=cfg.INPUT.FORMAT))["instances"].to("cpu")
        path = args.output_dir / f"{Path(image).stem}.png"
        drawn = draw_routed_predictions({"file_name": image}, instances, dataset, num_experts, path,
                                        args.max_boxes, args.score_thresh)
        written.append(report(path, drawn, args.score_thresh))
    return written


def run_mmdet(args) -> List[Path]:
    from mmdet.apis import DetInferencer
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import himoe_plugin.mmdet  # noqa: F401  (registers the modules)
    from himoe_plugin.mmdet.analysis import draw_routed_predictions, enable_output_routing

    cfg = Config.fromfile(args.config)
    enable_output_routing(cfg.model)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    require_moe_layers(MODELS.build(cfg.model), args.config)  # before DetInferencer loads the weights
    inferencer = DetInferencer(model=cfg, weights=args.checkpoint, device=args.device, show_progress=False)
    num_experts = max(info.num_experts for info in layer_infos(inferencer.model).values())
    classes = inferencer.model.dataset_meta["classes"]
    written = []
    for image in args.input:
        sample = inferencer(image, return_datasamples=True)["predictions"][0]
        path = args.output_dir / f"{Path(image).stem}.png"
        drawn = draw_routed_predictions(sample, classes, num_experts, path, args.max_boxes, args.score_thresh)
        written.append(report(path, drawn, args.score_thresh))
    return written


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    frameworks = parser.add_subparsers(dest="framework", required=True)
    d2 = frameworks.add_parser("detectron2")
    d2.add_argument("--config-file", required=True)
    d2.add_argument("--weights", required=True)
    d2.add_argument("--dataset", default="", help="registered dataset whose class names to show")
    d2.add_argument("--data-root", default="", help="folder of the bundled COCO-format datasets")
    d2.add_argument("--register", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                    help="register another COCO-format dataset (repeatable)")
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


def main(argv: Optional[list] = None) -> List[Path]:
    args = argument_parser().parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_detectron2(args) if args.framework == "detectron2" else run_mmdet(args)
    except (NoMoELayersError, MoEConfigError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.exit(f"demo_routing.py: error: {message}")


if __name__ == "__main__":
    main(sys.argv[1:])
