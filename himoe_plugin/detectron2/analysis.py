"""Detectron2 side of the routing analysis: run a model (standard or cascade HI-MoE ROI heads) over
a registered dataset and hand every image's ground truth and routed RoIs to
``himoe_plugin.analysis``; draw predictions coloured by expert with Detectron2's ``Visualizer``."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import BoxMode, Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..analysis import (ImageTruth, RoutedInstances, RoutingAnalysis, draw_expert_legend, expert_colors,
                        no_prediction_note, routed_box_label)
from ..analysis.capture import RoutingCapture, layer_infos


def require_registered_dataset(dataset_name: str, option: str = "--dataset") -> str:
    """``dataset_name``, or KeyError naming ``option`` and the registered datasets if it is not
    in Detectron2's ``DatasetCatalog`` (checked before any model is built)."""
    registered = DatasetCatalog.list()
    if dataset_name not in registered:
        close = difflib.get_close_matches(dataset_name, registered, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KeyError(f"{option} {dataset_name!r} is not a registered dataset ({hint}{len(registered)} are "
                       "registered; add a COCO-format one with --register NAME JSON IMAGE_DIR)")
    return dataset_name


def dataset_truths(dataset_name: str) -> Dict[int, ImageTruth]:
    """Ground truth (XYXY_ABS boxes, contiguous class ids, crowd boxes left out) by image id."""
    truths = {}
    for record in DatasetCatalog.get(dataset_name):
        annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        truths[record["image_id"]] = ImageTruth(
            image_id=record["image_id"],
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor([a["category_id"] for a in annotations], dtype=torch.long),
        )
    return truths


def new_analysis(model, dataset_name: str) -> RoutingAnalysis:
    """An empty analysis of ``model``'s MoE layers on the classes of ``dataset_name``."""
    metadata = MetadataCatalog.get(dataset_name)
    return RoutingAnalysis(metadata.thing_classes, layer_infos(model),
                           getattr(metadata, "thing_supercategories", None))


def pooled_boxes(pooler: ROIPooler):
    """Reads a pooler call's inputs: the boxes per image and the FPN level (``P<l>``) of each."""

    def read(args) -> Tuple[List[torch.Tensor], List[str]]:
        box_lists = args[1]
        if len(pooler.level_poolers) == 1:
            levels = torch.zeros(sum(len(b) for b in box_lists), dtype=torch.long)
        else:
            levels = assign_boxes_to_levels(box_lists, pooler.min_level, pooler.max_level,
                                            pooler.canonical_box_size, pooler.canonical_level)
        return [b.tensor for b in box_lists], [f"P{pooler.min_level + int(i)}" for i in levels.tolist()]

    return read


def routed_images(model, data_loader, max_images: Optional[int] = None
                  ) -> Iterator[Tuple[dict, Instances, List[RoutedInstances]]]:
    """Run ``model`` (in eval mode) over ``data_loader``; per image yield its input dict, its
    predicted ``Instances`` and the routing of every RoI in every MoE layer (every stage of a
    cascade), with boxes in original image pixels. ROI heads that can put the routing into
    their predictions (``output_routing``) do so meanwhile: ``pred_experts``,
    ``pred_expert_weights``."""
    model.eval()
    roi_heads = model.roi_heads
    previous = getattr(roi_heads, "output_routing", None)
    if previous is not None:
        roi_heads.output_routing = True
    seen = 0
    try:
        with torch.no_grad(), RoutingCapture(model, {roi_heads.box_pooler: pooled_boxes(roi_heads.box_pooler)}) as capture:
            for inputs in data_loader:
                capture.clear()
                outputs = model(inputs)
                routed: List[List[RoutedInstances]] = [[] for _ in inputs]
                for layer, routing, (boxes, levels) in capture.pairs:
                    start = 0
                    for i, (image_boxes, sample) in enumerate(zip(boxes, inputs)):
                        rows = slice(start, start + len(image_boxes))
                        height, width = sample["image"].shape[-2:]
                        scale = image_boxes.new_tensor([sample["width"] / width, sample["height"] / height] * 2)
                        routed[i].append(RoutedInstances(
                            layer, image_boxes * scale, routing.expert_index[rows], routing.combine_weight[rows],
                            routing.scene_groups[i], levels[rows]))
                        start += len(image_boxes)
                for sample, output, image_routing in zip(inputs, outputs, routed):
                    yield sample, output["instances"].to("cpu"), image_routing
                    seen += 1
                    if max_images is not None and seen >= max_images:
                        return
    finally:
        if previous is not None:
            roi_heads.output_routing = previous


def draw_routed_predictions(sample: dict, instances: Instances, dataset_name: str, num_experts: int,
                            path: Path, max_boxes: int = 20, score_thresh: float = 0.0) -> int:
    """Draw the ``max_boxes`` best predictions with score >= ``score_thresh`` on the image, each
    box in the colour of its first expert, labelled ``<class> | expert <e> (w <weight>)``, with a
    legend of the expert colours; an image without such predictions says so on a band at the
    bottom. Writes ``path``; returns the number of boxes drawn. ``instances`` need
    ``pred_experts`` / ``pred_expert_weights`` (ROI heads with ``output_routing``)."""
    if len(instances) and not instances.has("pred_experts"):
        raise ValueError("the predictions carry no routing (pred_experts): the ROI heads need "
                         "MODEL.HIMOE.OUTPUT_ROUTING (InstanceMoEROIHead, InstanceMoECascadeROIHeads)")
    keep = instances[instances.scores >= score_thresh]
    keep = keep[keep.scores.argsort(descending=True)[:max_boxes]]
    metadata = MetadataCatalog.get(dataset_name)
    colors = expert_colors(num_experts)
    experts, weights = ((keep.pred_experts[:, 0].tolist(), keep.pred_expert_weights[:, 0].tolist()) if len(keep)
                        else ([], []))
    labels = [routed_box_label(metadata.thing_classes[c], e, w)
              for c, e, w in zip(keep.pred_classes.tolist(), experts, weights)]
    visualizer = Visualizer(read_image(sample["file_name"], format="RGB"), metadata)
    drawn = visualizer.overlay_instances(boxes=keep.pred_boxes.tensor.numpy(), labels=labels,
                                         assigned_colors=[colors[e] for e in experts])
    best = float(instances.scores.max()) if len(instances) else None
    note = None if len(keep) else no_prediction_note(score_thresh, best)
    Image.fromarray(draw_expert_legend(drawn.get_image(), num_experts, experts, note)).save(path)
    return len(keep)
