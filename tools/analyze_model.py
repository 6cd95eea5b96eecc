#!/usr/bin/env python
"""Detectron2's tools/analyze_model.py for HI-MoE (and stock) yaml configs: parameters, FLOPs,
activations and structure.

    python tools/analyze_model.py --tasks parameter --config-file configs/detectron2/himoe_faster_rcnn_R_50_FPN_1x.yaml
    python tools/analyze_model.py --tasks flop -n 10 --config-file <cfg> MODEL.WEIGHTS output/model_final.pth
    python tools/analyze_model.py --tasks structure --config-file <cfg>

The same tasks and output as Detectron2's tool; the config may use ``model_zoo://`` bases and
``MODEL.HIMOE`` keys (it is read like tools/train_net.py reads it, errors name the key). The
parameter task also reports total vs active parameters (an RoI runs through ``TOP_K`` of the
``NUM_EXPERTS`` experts of each HI-MoE layer). FLOPs count what ran: the experts' sparse
dispatch counts ``TOP_K`` expert MLPs per RoI (fvcore counts one multiply-add as one FLOP).
Data for flop/activation: DATASETS.TEST[0] (bundled datasets from --data-root, or --register).
"""
import logging
from collections import Counter
from typing import Callable, List, Tuple

import numpy as np
import tqdm
from detectron2.data import build_detection_test_loader
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis, activation_count_operators, parameter_count_table
from detectron2.utils.logger import setup_logger
from fvcore.nn import flop_count_table

from himoe_plugin.core import count_parameters
from himoe_plugin.detectron2 import SafeDetectionCheckpointer
from himoe_plugin.detectron2.config import load_tool_cfg
from himoe_plugin.detectron2.data import add_dataset_arguments, register_datasets_from_args

logger = logging.getLogger("detectron2")


def setup(args):
    cfg = load_tool_cfg(args.config_file, args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.freeze()
    setup_logger(name="fvcore")
    setup_logger(name="himoe_plugin")
    setup_logger()
    return cfg


def trained_model(cfg):
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def per_input_counts(cfg, num_inputs: int, count_one: Callable) -> Tuple[Counter, List[float]]:
    """``count_one(model, inputs, index) -> (per-operator Counter, total)`` over the first
    ``num_inputs`` inputs of DATASETS.TEST[0]; returns the summed counter and the totals."""
    data_loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    model = trained_model(cfg)
    counts, totals = Counter(), []
    for index, data in zip(tqdm.trange(num_inputs), data_loader):
        per_operator, total = count_one(model, data, index)
        counts += per_operator
        totals.append(total)
    return counts, totals


def do_flop(cfg, num_inputs):
    tables = []

    def count_one(model, data, index):
        flops = FlopCountAnalysis(model, data)
        if index > 0:
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        else:
            tables.append(flop_count_table(flops))
        return flops.by_operator(), flops.total()

    counts, totals = per_input_counts(cfg, num_inputs, count_one)
    logger.info("Flops table computed from only one input sample:\n" + tables[0])
    logger.info(
        "Average GFlops for each type of operators:\n"
        + str([(k, v / len(totals) / 1e9) for k, v in counts.items()])
    )
    logger.info("Total GFlops: {:.1f}±{:.1f}".format(np.mean(totals) / 1e9, np.std(totals) / 1e9))


def do_activation(cfg, num_inputs):
    def count_one(model, data, index):
        count = activation_count_operators(model, data)
        return count, sum(count.values())

    counts, totals = per_input_counts(cfg, num_inputs, count_one)
    logger.info(
        "(Million) Activations for Each Type of Operators:\n"
        + str([(k, v / len(totals)) for k, v in counts.items()])
    )
    logger.info("Total (Million) Activations: {}±{}".format(np.mean(totals), np.std(totals)))


def do_parameter(cfg, num_inputs):
    model = build_model(cfg)
    logger.info("Parameter Count:\n" + parameter_count_table(model, max_depth=5))
    count = count_parameters(model)
    logger.info(
        f"HI-MoE parameters: total {count.total / 1e6:.2f} M, active per RoI {count.active / 1e6:.2f} M "
        f"({count.active / count.total:.1%}); routed experts {count.experts / 1e6:.2f} M"
    )


def do_structure(cfg, num_inputs):
    logger.info("Model Structure:\n" + str(build_model(cfg)))


TASKS = {"flop": do_flop, "activation": do_activation, "parameter": do_parameter, "structure": do_structure}


def main(args):
    if args.eval_only or args.num_gpus != 1:
        raise SystemExit("analyze_model.py runs one process and takes no --eval-only")
    register_datasets_from_args(args)
    cfg = setup(args)
    for task in args.tasks:
        TASKS[task](cfg, args.num_inputs)


def argument_parser():
    parser = add_dataset_arguments(default_argument_parser(epilog=__doc__))
    parser.add_argument("--tasks", choices=sorted(TASKS), required=True, nargs="+")
    parser.add_argument(
        "-n", "--num-inputs", default=100, type=int,
        help="number of inputs used to compute statistics for flops/activations (both data-dependent)",
    )
    return parser


if __name__ == "__main__":
    main(argument_parser().parse_args())
