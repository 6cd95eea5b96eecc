"""PNG figures of a routing analysis (matplotlib, Agg): attribute x expert heatmaps and scene-group
usage per supercategory, one set per MoE layer; plus the expert colours, labels and legend of the
example images."""
from __future__ import annotations

import colorsys
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: (summary key = file suffix, row axis label, attribute name in the title) of the heatmaps.
HEATMAPS = (
    ("class_expert", "ground-truth class (IoU >= 0.5)", "class of the objects"),
    ("size_expert", "object size (COCO)", "size"),
    ("level_expert", "feature level", "level"),
)


def expert_colors(num_experts: int) -> List[Tuple[float, float, float]]:
    """A distinct, saturated RGB colour (0..1) per expert: hues evenly spaced around the circle."""
    return [colorsys.hsv_to_rgb(e / max(1, num_experts), 0.9, 1.0) for e in range(num_experts)]


def routed_box_label(class_name: str, expert: int, weight: float) -> str:
    """Label of a prediction drawn in its first expert's colour: ``fish | expert 3 (w 0.51)``
    (``w``: that expert's combine weight, not a confidence)."""
    return f"{class_name} | expert {expert} (w {weight:.2f})"


def no_prediction_note(score_thresh: float, best_score: Optional[float]) -> str:
    """What an image without drawn predictions says: the threshold and the best score."""
    best = "no predictions" if best_score is None else f"best score {best_score:.2f}"
    return f"no prediction with score >= {score_thresh:.2f} ({best})"


def draw_expert_legend(image: np.ndarray, num_experts: int, used: Sequence[int] = (),
                       note: Optional[str] = None) -> np.ndarray:
    """``image`` (H, W, 3) uint8 RGB with a legend of the expert colours in its top-left corner
    (experts of drawn boxes in bold frames: ``used``) and, if given, ``note`` on a dark band at
    the bottom (e.g. ``no_prediction_note``). Returns a new array of the same shape."""
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    size = max(10, min(picture.size) // 40)
    font = ImageFont.load_default(size=size)
    used = set(used)
    x, y = 4, 4
    width = int(draw.textlength(f"expert {num_experts - 1}", font=font)) + size + 10
    draw.rectangle([x - 2, y - 2, x + width + 2, y + num_experts * (size + 4) + 2], fill=(255, 255, 255))
    for expert, rgb in enumerate(expert_colors(num_experts)):
        color = tuple(int(255 * c) for c in rgb)
        top = y + expert * (size + 4)
        draw.rectangle([x, top, x + size, top + size], fill=color,
                       outline=(0, 0, 0), width=2 if expert in used else 1)
        draw.text((x + size + 6, top), f"expert {expert}", fill=(0, 0, 0), font=font)
    if note:
        _, text_top, _, text_bottom = draw.textbbox((0, 0), note, font=font)
        band = text_bottom - text_top + 12  # 6 pixels of black above and below the text
        height = picture.size[1]
        draw.rectangle([0, height - band, picture.size[0], height], fill=(0, 0, 0))
        draw.text((6, height - band + 6 - text_top), note, fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def _heatmap(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
             xlabel: str, ylabel: str, path: Path, unit: str) -> Path:
    """Annotated heatmap of ``values`` (rows, cols) in ``unit`` ('%': fractions shown x100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if unit == "%":
        values = 100 * values
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(3.6 + 0.8 * cols, 1.9 + 0.45 * rows))
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=max(1e-9, float(values.max())), aspect="auto")
    ax.set_xticks(range(cols), labels=col_labels, fontsize=10)
    ax.set_yticks(range(rows), labels=row_labels, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.set_title(title, fontsize=11)
    threshold = 0.55 * values.max() if values.size else 0.0
    for r in range(rows):
        for c in range(cols):
            text = f"{values[r, c]:.0f}" if unit == "%" else f"{values[r, c]:.2f}"
            ax.text(c, r, text, ha="center", va="center", fontsize=9,
                    color="white" if values[r, c] > threshold else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label(unit, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _file_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer)


def write_figures(summary: Dict[str, object], out_dir: Path) -> Dict[str, Path]:
    """Every figure of ``RoutingAnalysis.summary()``; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    for layer, entry in summary["layers"].items():
        experts = [f"e{e}" for e in range(entry["num_experts"])]
        for key, row_title, attribute in HEATMAPS:
            mass = np.asarray(entry[key]["mass"], dtype=float).reshape(len(entry[key]["rows"]), len(experts))
            totals = mass.sum(axis=1)
            keep = totals > 0
            if not keep.any():
                continue
            share = mass[keep] / totals[keep, None]
            labels = [f"{name} (n={total:.0f})" for name, total, k in zip(entry[key]["rows"], totals, keep) if k]
            metric = entry["metrics"][key]
            title = (f"{layer}: where each row's routing mass goes (% of the row)\n"
                     f"I({attribute}; expert) = {metric['mi_bits']:.3f} bits, normalised {metric['nmi']:.3f}")
            name = f"{_file_name(layer)}_{key}"
            paths[name] = _heatmap(share, labels, experts, title, "expert", row_title,
                                   out_dir / f"{name}.png", "%")
        scene = entry["scene_group_usage"]
        if scene:
            names = list(scene)
            usage = np.asarray([scene[n]["group_usage"] for n in names], dtype=float)
            labels = [f"{n} ({scene[n]['images']} img)" for n in names]
            name = f"{_file_name(layer)}_scene_groups"
            paths[name] = _heatmap(
                usage, labels, [f"g{g}" for g in range(entry["num_groups"])],
                f"{layer}: scene subsets\nimages (% of the row) whose subset kept each group",
                "expert group", "images containing supercategory", out_dir / f"{name}.png", "%")
    return paths
