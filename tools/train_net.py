#!/usr/bin/env python
"""Train or evaluate HI-MoE (or stock) Detectron2 models, like Detectron2's tools/train_net.py.

    python tools/train_net.py --config-file configs/detectron2/aquarium/himoe_faster_rcnn_R_18_FPN_aquarium.yaml
    python tools/train_net.py --config-file <cfg> --num-gpus 8                 # multi-GPU (NCCL)
    python tools/train_net.py --config-file <cfg> --num-gpus 2                 # 2 CPU processes (gloo) without CUDA
    python tools/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file <cfg> --resume

The bundled datasets (aquarium_train, aquarium_valid, coco128_train) are registered from
--data-root (default $HIMOE_DATA_ROOT or ../shared/data); --register NAME JSON IMAGE_DIR adds
any other COCO-format dataset. Without CUDA the model runs on CPU.
"""
import os
import sys

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from himoe_plugin.detectron2 import (
    SafeDetectionCheckpointer,
    get_himoe_cfg,
    register_bundled_datasets,
    register_coco_dataset,
)
from himoe_plugin.detectron2.config import validate_himoe_cfg
from himoe_plugin.detectron2.data import default_data_root
from himoe_plugin.detectron2.engine import HIMoETrainer, launch

def register_datasets(args) -> None:
    data_root = args.data_root or default_data_root()
    if args.data_root or os.path.isdir(data_root):
        register_bundled_datasets(data_root)
    for name, json_file, image_root in args.register or []:
        register_coco_dataset(name, json_file, image_root)


def setup(args):
    cfg = get_himoe_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if "InstanceMoE" in cfg.MODEL.ROI_HEADS.NAME:
        validate_himoe_cfg(cfg)
    if cfg.TEST.AUG.ENABLED:
        raise NotImplementedError("TEST.AUG.ENABLED: test-time augmentation is not supported by this tool")
    cfg.freeze()
    default_setup(cfg, args)
    # As Detectron2's projects do: the plugin's own messages (e.g. the upcycling report).
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="himoe_plugin")
    return cfg


def main(args):
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = HIMoETrainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = HIMoETrainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = HIMoETrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument("--data-root", default="", help="folder of the bundled COCO-format datasets")
    parser.add_argument(
        "--register",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register another COCO-format dataset (repeatable)",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args, file=sys.stderr)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
