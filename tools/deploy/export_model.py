#!/usr/bin/env python
"""Detectron2's tools/deploy/export_model.py for HI-MoE (and stock) Faster / Mask / Cascade R-CNN:
export a trained model to TorchScript or ONNX, optionally evaluate the exported file.

    python tools/deploy/export_model.py --format torchscript --export-method tracing \\
        --config-file configs/detectron2/aquarium/himoe_faster_rcnn_R_18_FPN_aquarium.yaml \\
        --output output/deploy --run-eval MODEL.WEIGHTS output/detectron2/aquarium_himoe/model_final.pth

Same interface as Detectron2's tool: ``--format torchscript|onnx``, ``--export-method
tracing|scripting``, ``--sample-image``, ``--run-eval``, ``--config-file`` (yaml with
``model_zoo://`` bases and ``MODEL.HIMOE`` keys, or a LazyConfig ``.py``), ``--output`` and
``KEY VALUE`` overrides (yaml keys, or LazyConfig ``path=value``). Weights: ``MODEL.WEIGHTS``
(yaml) or ``train.init_checkpoint`` (LazyConfig). Datasets: the bundled ones (``--data-root``)
and ``--register NAME JSON IMAGE_DIR``; the sample and the evaluation use the config's test set.

Tracing records the model with Detectron2's ``TracingAdapter`` on one sample image. HI-MoE
layers switch to their export formulation while being traced (``himoe_plugin.core.exporting``):
every expert stays in the graph, each computes only the RoIs routed to it, and no routing size
is frozen, so the file is exact on any image (writes ``model.ts`` or ``model.onnx``; the ONNX
file takes images of any size, batch 1, and runs in ONNX Runtime). The exported models return
detections before the final resize to the original image (as Detectron2's); ``--run-eval``
adds that resize, evaluates the exported model (TorchScript, or ONNX Runtime for ``onnx``) and
the eager model on DATASETS.TEST[0] with COCO AP, and prints both.
Scripting (``--export-method scripting``, TorchScript only) works for stock models; HI-MoE
models stop with an error naming their first MoE layer (it passes Python dataclasses).
"""
import argparse
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import build_detection_test_loader, detection_utils
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes
from detectron2.utils.logger import setup_logger

from himoe_plugin.core import MoEBlock
from himoe_plugin.detectron2 import SafeDetectionCheckpointer
from himoe_plugin.detectron2.config import load_tool_cfg
from himoe_plugin.detectron2.data import add_dataset_arguments, register_datasets_from_args
from himoe_plugin.detectron2.engine import has_fast_coco_eval

logger = logging.getLogger("detectron2")

#: ONNX opset of the TorchScript-based exporter (RoiAlign with aligned boxes needs >= 16).
ONNX_OPSET = 17
#: The fields of Detectron2's ``Instances`` that a scripted R-CNN carries.
SCRIPTED_FIELDS = {
    "proposal_boxes": Boxes, "objectness_logits": torch.Tensor, "pred_boxes": Boxes,
    "scores": torch.Tensor, "pred_classes": torch.Tensor, "pred_masks": torch.Tensor,
}
#: --run-eval: an exported detection equals an eager one within these (boxes in pixels).
BOX_ATOL, SCORE_ATOL = 1e-3, 1e-4


@dataclass
class Deployable:
    """A trained model in eval mode and how its config feeds it."""

    model: torch.nn.Module
    test_dataset: str
    test_loader: Callable[[], object]  # builds the test data loader
    resize: T.Augmentation  # test-time resize of one image
    image_format: str


def load_yaml(args) -> Deployable:
    cfg = load_tool_cfg(args.config_file, args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.freeze()
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    dataset = cfg.DATASETS.TEST[0]
    return Deployable(
        model=model.eval(),
        test_dataset=dataset,
        test_loader=lambda: build_detection_test_loader(cfg, dataset),
        resize=T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST),
        image_format=cfg.INPUT.FORMAT,
    )


def load_lazy(args) -> Deployable:
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    cfg.dataloader.test.num_workers = 0
    model = instantiate(cfg.model)
    model.to(cfg.train.device if torch.cuda.is_available() else "cpu")
    SafeDetectionCheckpointer(model).load(cfg.train.init_checkpoint)
    (resize,) = [a for a in instantiate(cfg.dataloader.test.mapper.augmentations)
                 if isinstance(a, T.ResizeShortestEdge)]
    return Deployable(
        model=model.eval(),
        test_dataset=cfg.dataloader.test.dataset.names,
        test_loader=lambda: instantiate(cfg.dataloader.test),
        resize=resize,
        image_format=model.input_format,
    )


def sample_inputs(args, deployable: Deployable) -> List[Dict]:
    """``--sample-image`` resized like the test set, else the first test image."""
    if args.sample_image is None:
        return next(iter(deployable.test_loader()))
    image = detection_utils.read_image(args.sample_image, format=deployable.image_format)
    height, width = image.shape[:2]
    resized = deployable.resize.get_transform(image).apply_image(image)
    return [{"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)),
             "height": height, "width": width}]


def check_scripting(model: torch.nn.Module) -> None:
    """SystemExit naming the first HI-MoE layer: they cannot be scripted."""
    for name, module in model.named_modules():
        if isinstance(module, MoEBlock):
            raise SystemExit(
                f"--export-method scripting: '{name}' ({type(module).__name__}) cannot be scripted: "
                "HI-MoE layers take and return Python dataclasses (the routing), which "
                "torch.jit.script does not compile. Use --export-method tracing (exact on any "
                "image: the traced HI-MoE layers keep every expert and no routing size)."
            )


def export_scripting(args, model: torch.nn.Module) -> None:
    """``torch.jit.script`` a stock (dense) model as Detectron2's tool does; HI-MoE: SystemExit."""
    check_scripting(model)
    if args.format != "torchscript" or args.run_eval:
        raise SystemExit("--export-method scripting writes TorchScript only (--format torchscript), "
                         "without --run-eval (as Detectron2's tool)")
    scripted = scripting_with_instances(model, SCRIPTED_FIELDS)
    path = os.path.join(args.output, "model.ts")
    scripted.save(path)
    logger.info(f"wrote {path}")


def warn_capacity(model: torch.nn.Module) -> None:
    """Exported HI-MoE layers are dropless: say so where a capacity limit is configured."""
    for name, module in model.named_modules():
        if isinstance(module, MoEBlock) and module.config.capacity_factor > 0:
            logger.warning(
                f"{name}: {module.router.key_of('capacity_factor')}={module.config.capacity_factor} "
                "is not applied by the exported model (exports are dropless: every routed RoI is "
                "computed), so it may differ from eager inference where that drops assignments"
            )


def tracing_adapter(model: torch.nn.Module, image: torch.Tensor) -> TracingAdapter:
    """Detectron2's ``TracingAdapter`` around ``model`` for one (3, H, W) image; R-CNN models
    return their detections before the final resize (and masks as RoI masks)."""
    inference = None
    if isinstance(model, GeneralizedRCNN):
        def inference(model, inputs):
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
    # eval(): torch.onnx.export restores the adapter's mode on the model after exporting.
    return TracingAdapter(model, [{"image": image}], inference).eval()


def export_tracing(args, model: torch.nn.Module, image: torch.Tensor):
    """Trace ``model`` on ``image``, write ``model.ts`` / ``model.onnx`` to ``--output``;
    returns ``(adapter, run)``, ``run(image) -> flat outputs`` of the exported file."""
    warn_capacity(model)
    adapter = tracing_adapter(model, image)
    if args.format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
        path = os.path.join(args.output, "model.ts")
        traced.save(path)
        logger.info(f"wrote {path}")
        return adapter, lambda x: traced(x)
    import onnxruntime

    path = os.path.join(args.output, "model.onnx")
    with torch.no_grad():
        torch.onnx.export(adapter, (image,), path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], dynamic_axes={"image": {1: "height", 2: "width"}})
    logger.info(f"wrote {path}")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor):
        return [torch.from_numpy(np.asarray(out)) for out in session.run(None, {"image": x.cpu().numpy()})]

    return adapter, run


def exported_predictor(adapter: TracingAdapter, run: Callable) -> Callable:
    """The exported model as a Detectron2 model for ``inference_on_dataset``: runs the file on
    each image, then the final resize to the original size that the file leaves out."""
    def predict(inputs: List[Dict]) -> List[Dict]:
        outputs = []
        for item in inputs:
            instances = adapter.outputs_schema(run(item["image"]))[0]["instances"]
            outputs.append({"instances": detector_postprocess(instances, item["height"], item["width"])})
        return outputs

    return predict


def evaluate(deployable: Deployable, model: Callable, output_dir: str, predictions: Dict) -> Dict:
    """COCO metrics of ``model`` on the test set; its detections go to ``predictions[image_id]``."""
    def recorded(inputs: List[Dict]) -> List[Dict]:
        outputs = model(inputs)
        for item, output in zip(inputs, outputs):
            predictions[item["image_id"]] = output["instances"].to("cpu")
        return outputs

    evaluator = COCOEvaluator(deployable.test_dataset, output_dir=output_dir, use_fast_impl=has_fast_coco_eval())
    return inference_on_dataset(recorded, deployable.test_loader(), evaluator)


def compare_detections(eager: Dict, exported: Dict, box_atol: float = BOX_ATOL, score_atol: float = SCORE_ATOL) -> str:
    """One line: how many eager detections the exported model reproduced (one-to-one: same
    label and experts, box within ``box_atol`` px, score within ``score_atol``; the order of
    equal scores is free) and the largest box difference of the matched ones."""
    total = unmatched = 0
    largest = 0.0
    for image_id, reference in eager.items():
        candidate = exported[image_id]
        total += len(reference)
        taken = torch.zeros(len(candidate), dtype=torch.bool)
        for i in range(len(reference)):
            box_diff = (candidate.pred_boxes.tensor - reference.pred_boxes.tensor[i]).abs().amax(dim=1)
            same = (~taken & (candidate.pred_classes == reference.pred_classes[i])
                    & ((candidate.scores - reference.scores[i]).abs() <= score_atol) & (box_diff <= box_atol))
            if reference.has("pred_experts"):
                same &= (candidate.pred_experts == reference.pred_experts[i]).all(dim=1)
            match = torch.nonzero(same)
            if len(match) == 0:
                unmatched += 1
                continue
            taken[match[0, 0]] = True
            largest = max(largest, float(box_diff[match[0, 0]]))
        unmatched += max(0, len(candidate) - len(reference))  # exported detections eager lacks
    return (f"exported vs eager detections on {len(eager)} images: {total - unmatched} of {total} equal "
            f"(label{', experts' if _has_experts(eager) else ''}, box within {box_atol} px, score within "
            f"{score_atol}), {unmatched} unmatched; largest box difference {largest:.2e} px")


def _has_experts(predictions: Dict) -> bool:
    return any(p.has("pred_experts") for p in predictions.values())


def main(args) -> Optional[Dict[str, Dict]]:
    setup_logger()
    setup_logger(name="himoe_plugin")
    logger.info(f"Command line arguments: {args}")
    os.makedirs(args.output, exist_ok=True)
    register_datasets_from_args(args)
    load = load_lazy if args.config_file.endswith(".py") else load_yaml
    deployable = load(args)
    model = deployable.model
    if args.export_method == "scripting":
        export_scripting(args, model)
        return None
    image = sample_inputs(args, deployable)[0]["image"]
    adapter, run = export_tracing(args, model, image)
    logger.info(f"Inputs schema: {adapter.inputs_schema}")
    logger.info(f"Outputs schema: {adapter.outputs_schema}")
    if not args.run_eval:
        return None
    if not isinstance(model, GeneralizedRCNN):
        raise SystemExit(f"--run-eval: evaluates R-CNN models, not {type(model).__name__}")
    logger.info(f"Evaluating the exported ({args.format}) and the eager model on {deployable.test_dataset}")
    predictions = {"exported": {}, "eager": {}}
    results = {
        "exported": evaluate(deployable, exported_predictor(adapter, run), os.path.join(args.output, "exported"),
                             predictions["exported"]),
        "eager": evaluate(deployable, model, os.path.join(args.output, "eager"), predictions["eager"]),
    }
    for name, metrics in results.items():
        logger.info(f"{name} model:")
        print_csv_format(metrics)
    exported_ap, eager_ap = results["exported"]["bbox"]["AP"], results["eager"]["bbox"]["AP"]
    logger.info(f"bbox AP: exported {exported_ap:.4f}, eager {eager_ap:.4f}")
    logger.info(compare_detections(predictions["eager"], predictions["exported"]))
    return results


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="output format")
    parser.add_argument("--export-method", choices=["tracing", "scripting"], default="tracing",
                        help="how to export (HI-MoE models: tracing)")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="yaml or LazyConfig .py")
    parser.add_argument("--sample-image", default=None, help="image to trace on (default: the first test image)")
    parser.add_argument("--run-eval", action="store_true", help="COCO AP of the exported and the eager model")
    parser.add_argument("--output", required=True, help="output directory for the exported model")
    add_dataset_arguments(parser)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides: yaml 'KEY VALUE' pairs, LazyConfig 'path=value'")
    return parser


if __name__ == "__main__":
    main(argument_parser().parse_args())
