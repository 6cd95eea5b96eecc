"""Routing analysis shared by both frameworks: collect routed instances image by image, then
write the tidy table, the specialization metrics (JSON) and the figures (PNG)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .table import BACKGROUND, SIZES, ImageTruth, RoutedInstances, RoutingTable


@dataclass(frozen=True)
class LayerInfo:
    """Size of one MoE layer: experts E and scene groups G."""

    num_experts: int
    num_groups: int


def entropy_bits(p: np.ndarray) -> float:
    """Entropy (bits) of a distribution given by non-negative weights."""
    total = p.sum()
    if total <= 0:
        return 0.0
    q = p[p > 0] / total
    return max(0.0, float(-(q * np.log2(q)).sum()))


def mutual_information_bits(joint: np.ndarray) -> float:
    """I(A; E) in bits of the joint distribution given by non-negative weights (A, E)."""
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    outer = p.sum(axis=1, keepdims=True) @ p.sum(axis=0, keepdims=True)
    nonzero = p > 0
    return float((p[nonzero] * np.log2(p[nonzero] / outer[nonzero])).sum())


def specialization(joint: np.ndarray) -> Dict[str, float]:
    """``mi_bits`` I(A; E), and ``nmi`` = I / min(H(A), H(E)) in [0, 1] (0: experts independent
    of A; 1: one determines the other)."""
    mi = mutual_information_bits(joint)
    bound = min(entropy_bits(joint.sum(axis=1)), entropy_bits(joint.sum(axis=0)))
    return {"mi_bits": mi, "nmi": mi / bound if bound > 0 else 0.0}


class RoutingAnalysis:
    """Routing of a detector over a dataset, per MoE layer.

    Every instance spreads its combine weights over its k experts ("routing mass"); the
    matrices sum that mass per (attribute value, expert), where the attributes are the matched
    ground-truth class (with ``background``), the COCO object size and the feature level.

    Args:
        class_names: the dataset's classes, in label order.
        layers: the MoE layers to analyse, name -> ``LayerInfo``.
        supercategories: the supercategory of every class (None: unknown).
    """

    def __init__(self, class_names: Sequence[str], layers: Dict[str, LayerInfo],
                 supercategories: Optional[Sequence[str]] = None):
        self.class_names = list(class_names)
        self.layers = dict(layers)
        self.supercategories = list(supercategories) if supercategories is not None else None
        self.table = RoutingTable(self.class_names)
        self.num_images = 0
        # layer -> supercategory -> [images with it, images that kept group g (G,)]
        self._scene: Dict[str, Dict[str, List]] = defaultdict(dict)

    def add_image(self, truth: ImageTruth, routed: Sequence[RoutedInstances]) -> None:
        """Record one image: its ground truth and what every MoE layer routed in it."""
        self.num_images += 1
        present = sorted({self.supercategories[i] for i in truth.labels.tolist()}) if self.supercategories else []
        for instances in routed:
            if instances.layer not in self.layers:
                raise KeyError(f"layer {instances.layer!r} is not one of {sorted(self.layers)}")
            self.table.add(truth, instances)
            groups = self.layers[instances.layer].num_groups
            kept = np.zeros(groups)
            kept[instances.scene_groups.cpu().numpy()] = 1
            for name in ["all images", *present]:
                entry = self._scene[instances.layer].setdefault(name, [0, np.zeros(groups)])
                entry[0] += 1
                entry[1] += kept

    # ---- summaries ----

    def _mass(self, layer: str, column: str, values: Sequence[str]) -> np.ndarray:
        """(len(values), E) routing mass of the layer's instances per value of ``column``."""
        index = {v: i for i, v in enumerate(values)}
        out = np.zeros((len(values), self.layers[layer].num_experts))
        for row in self.table.rows:
            if row["layer"] != layer or row[column] not in index:
                continue
            for r in range(self.table.top_k):
                if f"expert_{r}" in row:
                    out[index[row[column]], row[f"expert_{r}"]] += row[f"weight_{r}"]
        return out

    def _instances_per_expert(self, layer: str) -> List[int]:
        """How many of the layer's instances each expert got (with a non-zero weight)."""
        counts = [0] * self.layers[layer].num_experts
        for row in self.table.rows:
            if row["layer"] != layer:
                continue
            for r in range(self.table.top_k):
                if f"expert_{r}" in row and row[f"weight_{r}"] > 0:
                    counts[row[f"expert_{r}"]] += 1
        return counts

    def _levels(self, layer: str) -> List[str]:
        levels = {row["level"] for row in self.table.rows if row["layer"] == layer and row["level"]}
        return sorted(levels, key=lambda name: (len(name), name))

    def summary(self) -> Dict[str, object]:
        """Everything the figures show, plus the specialization metrics, as plain JSON types."""
        out: Dict[str, object] = {"images": self.num_images, "classes": self.class_names, "layers": {}}
        for layer, info in self.layers.items():
            classes = self.class_names + [BACKGROUND]
            class_mass = self._mass(layer, "gt_class", classes)
            size_mass = self._mass(layer, "size", SIZES)
            levels = self._levels(layer)
            level_mass = self._mass(layer, "level", levels)
            foreground = class_mass[:-1]
            # None for experts without foreground instances: 0 bits would read as one class only.
            expert_entropy = [entropy_bits(foreground[:, e]) if foreground[:, e].sum() > 0 else None
                              for e in range(info.num_experts)]
            top_class = [self.class_names[int(foreground[:, e].argmax())] if foreground[:, e].sum() > 0 else None
                         for e in range(info.num_experts)]
            total = class_mass.sum()
            scene = {name: {"images": n, "group_usage": (kept / max(n, 1)).tolist()}
                     for name, (n, kept) in self._scene[layer].items()}
            out["layers"][layer] = {
                "num_experts": info.num_experts,
                "num_groups": info.num_groups,
                "instances": sum(1 for row in self.table.rows if row["layer"] == layer),
                "expert_load": (class_mass.sum(axis=0) / total).tolist() if total > 0 else [],
                "expert_instances": self._instances_per_expert(layer),
                "class_expert": {"rows": classes, "mass": class_mass.tolist()},
                "size_expert": {"rows": list(SIZES), "mass": size_mass.tolist()},
                "level_expert": {"rows": levels, "mass": level_mass.tolist()},
                "scene_group_usage": scene,
                "metrics": {
                    "class_expert": specialization(foreground),
                    "class_expert_with_background": specialization(class_mass),
                    "size_expert": specialization(size_mass),
                    "level_expert": specialization(level_mass) if levels else None,
                    "expert_class_entropy_bits": expert_entropy,
                    "max_class_entropy_bits": math.log2(len(self.class_names)) if self.class_names else 0.0,
                    "expert_top_class": top_class,
                },
            }
        return out

    def write(self, out_dir: Path, extra: Optional[Dict[str, object]] = None) -> Dict[str, Path]:
        """``routing.csv``, ``summary.json`` (with the entries of ``extra`` added) and
        ``figures/<layer>_*.png`` under ``out_dir``."""
        from .figures import write_figures

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"table": out_dir / "routing.csv", "summary": out_dir / "summary.json"}
        self.table.write_csv(paths["table"])
        summary = dict(self.summary(), **(extra or {}))
        paths["summary"].write_text(json.dumps(summary, indent=2))
        paths.update(write_figures(summary, out_dir / "figures"))
        return paths


def format_metrics(summary: Dict[str, object]) -> str:
    """Human-readable specialization metrics of every layer."""
    lines = [f"routing analysis of {summary['images']} images"]
    for layer, entry in summary["layers"].items():
        metrics = entry["metrics"]
        lines.append(f"[{layer}] {entry['instances']} instances, {entry['num_experts']} experts")
        for name in ("class_expert", "class_expert_with_background", "size_expert", "level_expert"):
            if metrics[name] is not None:
                lines.append(f"  I({name.replace('_expert', '').replace('_with_background', '+bg')}; expert) = "
                             f"{metrics[name]['mi_bits']:.3f} bits (normalised {metrics[name]['nmi']:.3f})")
        load = entry["expert_load"]
        counts = entry["expert_instances"]
        for e, (bits, top) in enumerate(zip(metrics["expert_class_entropy_bits"], metrics["expert_top_class"])):
            if counts[e] == 0:
                lines.append(f"  expert {e}: unused (n=0)")
            elif top is None:
                lines.append(f"  expert {e}: load {load[e]:.3f}, n={counts[e]}, background only (no instance "
                             "matched a ground-truth box)")
            else:
                lines.append(f"  expert {e}: load {load[e]:.3f}, n={counts[e]}, class entropy {bits:.2f} / "
                             f"{metrics['max_class_entropy_bits']:.2f} bits, most frequent class {top}")
    return "\n".join(lines)
