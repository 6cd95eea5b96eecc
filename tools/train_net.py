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
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from himoe_plugin.detectron2 import SafeDetectionCheckpointer
from himoe_plugin.detectron2.config import load_tool_cfg
from himoe_plugin.detectron2.data import add_dataset_arguments, register_datasets_from_args
from himoe_plugin.detectron2.engine import HIMoETrainer, launch


def setup(args):
    cfg = load_tool_cfg(args.config_file, args.opts)
    if cfg.TEST.AUG.ENABLED:
        raise NotImplementedError("TEST.AUG.ENABLED: test-time augmentation is not supported by this tool")
    cfg.freeze()
    default_setup(cfg, args)
    # As Detectron2's projects do: the plugin's own messages (e.g. the upcycling report).
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="himoe_plugin")
    return cfg


def main(args):
    register_datasets_from_args(args)
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


if __name__ == "__main__":
    args = add_dataset_arguments(default_argument_parser()).parse_args()
    print("Command Line Args:", args, file=sys.stderr)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
