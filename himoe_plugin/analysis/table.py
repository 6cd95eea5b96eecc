"""What the routing analysis records: per image, its ground truth and, per MoE layer, the routed
instances (RoIs or object queries); and the tidy table built from them (one row per instance)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

#: Label of instances that overlap no ground-truth box with IoU >= ``MATCH_IOU``.
BACKGROUND = "background"
MATCH_IOU = 0.5
#: COCO's object-size buckets: area < 32^2 small, < 96^2 medium, else large (pixels^2).
SIZES = ("small", "medium", "large")
SIZE_LIMITS = (32**2, 96**2)


@dataclass
class ImageTruth:
    """Ground truth of one image, in original image pixels.

    Attributes:
        image_id: the dataset's image id.
        boxes: (G, 4) float, x1 y1 x2 y2 (crowd boxes left out).
        labels: (G,) long, index into the analysis' class names.
    """

    image_id: int
    boxes: torch.Tensor
    labels: torch.Tensor


@dataclass
class RoutedInstances:
    """The instances one MoE layer routed in one image.

    Attributes:
        layer: name of the MoE layer (e.g. ``box_head``, ``decoder.5``).
        boxes: (n, 4) float, each instance's box (RoI / predicted box) in original image pixels.
        expert_index: (n, k) long, chosen experts, best first.
        combine_weight: (n, k) float, their weights (0 where the capacity limit dropped one).
        scene_groups: (k_s,) long, the expert groups the image's scene routing kept.
        levels: the feature level of each instance (e.g. ``P3``), or None where there is none.
    """

    layer: str
    boxes: torch.Tensor
    expert_index: torch.Tensor
    combine_weight: torch.Tensor
    scene_groups: torch.Tensor
    levels: Optional[Sequence[str]] = None


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, 4) x (g, 4) xyxy boxes -> (n, g) IoU."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=2)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)


def size_of(area: torch.Tensor) -> List[str]:
    """COCO size bucket of every area (pixels^2)."""
    buckets = torch.bucketize(area, torch.tensor(SIZE_LIMITS, dtype=area.dtype), right=True)
    return [SIZES[i] for i in buckets.tolist()]


class RoutingTable:
    """Tidy table of routed instances: one row per (image, layer, instance).

    Columns: ``image_id, layer, instance, x1, y1, x2, y2, gt_class, iou, size, level,
    scene_groups, expert_<r>, weight_<r>`` (r = 0 .. k-1, best first). ``gt_class`` is the class
    of the ground-truth box with the highest IoU if that IoU is >= 0.5, else ``background``;
    ``size`` is the COCO size bucket of that ground-truth box (of the instance's own box for
    background); ``level`` is empty where the layer has no feature levels; ``scene_groups``
    lists the image's kept groups separated by spaces.
    """

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.rows: List[Dict[str, object]] = []
        self.top_k = 0

    def add(self, truth: ImageTruth, routed: RoutedInstances) -> None:
        boxes = routed.boxes.detach().float().cpu()
        num = boxes.shape[0]
        if num == 0:
            return
        gt_boxes = truth.boxes.float().cpu().reshape(-1, 4)
        if gt_boxes.shape[0]:
            iou, match = box_iou(boxes, gt_boxes).max(dim=1)
        else:
            iou, match = boxes.new_zeros(num), torch.zeros(num, dtype=torch.long)
        matched = iou >= MATCH_IOU
        sized = torch.where(matched[:, None], gt_boxes[match] if gt_boxes.shape[0] else boxes, boxes)
        sizes = size_of((sized[:, 2] - sized[:, 0]) * (sized[:, 3] - sized[:, 1]))
        labels = truth.labels.cpu()
        experts = routed.expert_index.cpu().tolist()
        weights = routed.combine_weight.detach().float().cpu().tolist()
        self.top_k = max(self.top_k, routed.expert_index.shape[1])
        groups = " ".join(str(g) for g in routed.scene_groups.cpu().tolist())
        for i, (box, hit) in enumerate(zip(boxes.tolist(), matched.tolist())):
            row: Dict[str, object] = {
                "image_id": truth.image_id,
                "layer": routed.layer,
                "instance": i,
                "x1": round(box[0], 1), "y1": round(box[1], 1), "x2": round(box[2], 1), "y2": round(box[3], 1),
                "gt_class": self.class_names[int(labels[match[i]])] if hit else BACKGROUND,
                "iou": round(float(iou[i]), 3),
                "size": sizes[i],
                "level": routed.levels[i] if routed.levels is not None else "",
                "scene_groups": groups,
            }
            for r, (expert, weight) in enumerate(zip(experts[i], weights[i])):
                row[f"expert_{r}"] = expert
                row[f"weight_{r}"] = round(weight, 4)
            self.rows.append(row)

    @property
    def columns(self) -> List[str]:
        fixed = ["image_id", "layer", "instance", "x1", "y1", "x2", "y2", "gt_class", "iou", "size", "level",
                 "scene_groups"]
        return fixed + [f"{name}_{r}" for r in range(self.top_k) for name in ("expert", "weight")]

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
