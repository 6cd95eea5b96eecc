"""Detectron2 side of the routing analysis: run a model over a registered dataset and hand every
image's ground truth and routed RoIs to ``himoe_plugin.analysis``; draw predictions coloured by
expert with Detectron2's ``Visualizer``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import BoxMode, Instances
from detectron2.utils.visualizer import Visualizer

from ..analysis import ImageTruth, RoutedInstances, RoutingAnalysis, expert_colors
from ..analysis.capture import RoutingCapture, layer_infos


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
    """Run ``model`` (in eval mode, predictions with their routing) over ``data_loader``; per
    image yield its input dict, its predicted ``Instances`` (with ``pred_experts``,
    ``pred_expert_weights``) and the routing of every RoI in every MoE layer, with boxes in
    original image pixels."""
    model.eval()
    roi_heads = model.roi_heads
    previous = roi_heads.output_routing
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
        roi_heads.output_routing = previous


def draw_routed_predictions(sample: dict, instances: Instances, dataset_name: str, num_experts: int,
                            path: Path, max_boxes: int = 20, score_thresh: float = 0.0) -> Path:
    """Draw the ``max_boxes`` best predictions above ``score_thresh`` on the image, each box in
    the colour of its first expert, labelled ``<class> e<expert> <weight>``."""
    keep = instances[instances.scores >= score_thresh]
    keep = keep[keep.scores.argsort(descending=True)[:max_boxes]]
    metadata = MetadataCatalog.get(dataset_name)
    colors = expert_colors(num_experts)
    experts, weights = keep.pred_experts[:, 0].tolist(), keep.pred_expert_weights[:, 0].tolist()
    labels = [f"{metadata.thing_classes[c]} e{e} {w:.2f}" for c, e, w in zip(keep.pred_classes.tolist(), experts, weights)]
    visualizer = Visualizer(read_image(sample["file_name"], format="RGB"), metadata)
    drawn = visualizer.overlay_instances(boxes=keep.pred_boxes.tensor.numpy(), labels=labels,
                                         assigned_colors=[colors[e] for e in experts])
    drawn.save(str(path))
    return path
