#!/usr/bin/env python
"""Write a compact copy of the bundled COCO-format datasets (smaller JPEGs, rescaled labels).

    python tools/gpu/compact_dataset.py --src ../shared/data --dst gpu_bundle/data
    python tools/gpu/compact_dataset.py --src ../shared/data --dst /tmp/d --limit 8   # first 8 images per split

The copy keeps the layout of the source data root (``aquarium/images/{train,valid}``,
``aquarium/annotations/instances_{train,valid}.json``, ``coco128/images``,
``coco128/annotations/instances_train.json``), so it is a drop-in ``HIMOE_DATA_ROOT``. Every image
whose short side exceeds ``--short-side`` is resized to it (aspect kept, never enlarged) and
re-encoded as JPEG at ``--quality``; boxes, polygons, RLE masks, areas and the image sizes in the
JSON are rescaled with the same per-axis factors. Image and annotation ids are kept.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

#: (annotation json, image folder) of every split, relative to the data root.
SPLITS: Tuple[Tuple[str, str], ...] = (
    ("aquarium/annotations/instances_train.json", "aquarium/images/train"),
    ("aquarium/annotations/instances_valid.json", "aquarium/images/valid"),
    ("coco128/annotations/instances_train.json", "coco128/images"),
)


def scaled_size(width: int, height: int, short_side: int) -> Tuple[int, int]:
    """(width, height) with the short side at most ``short_side`` (aspect kept, never enlarged)."""
    scale = min(1.0, short_side / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def scale_segmentation(segmentation, sx: float, sy: float, new_size: Tuple[int, int]):
    """Polygons (list of [x0, y0, x1, y1, ...]) or an RLE dict, rescaled to ``new_size`` (w, h)."""
    if isinstance(segmentation, list):
        return [[round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(poly)] for poly in segmentation]
    from pycocotools import mask as mask_utils

    h, w = segmentation["size"]
    rle = mask_utils.frPyObjects(segmentation, h, w) if isinstance(segmentation["counts"], list) else segmentation
    mask = Image.fromarray(mask_utils.decode(rle) * 255).resize(new_size, Image.NEAREST)
    encoded = mask_utils.encode(np.asfortranarray((np.asarray(mask) > 127).astype(np.uint8)))
    return {"size": [new_size[1], new_size[0]], "counts": encoded["counts"].decode("ascii")}


def scale_annotation(ann: dict, sx: float, sy: float, new_size: Tuple[int, int]) -> dict:
    """A COCO annotation of an image rescaled by (sx, sy) to ``new_size`` (w, h)."""
    x, y, w, h = ann["bbox"]
    x0, y0 = min(x * sx, new_size[0]), min(y * sy, new_size[1])
    x1, y1 = min((x + w) * sx, new_size[0]), min((y + h) * sy, new_size[1])
    out = dict(ann, bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)])
    out["area"] = round(ann["area"] * sx * sy, 2)
    if ann.get("segmentation"):
        out["segmentation"] = scale_segmentation(ann["segmentation"], sx, sy, new_size)
    return out


def compact_split(src_json: Path, src_images: Path, dst_json: Path, dst_images: Path,
                  short_side: int, quality: int, limit: int = 0) -> Dict[str, int]:
    """Compact one split; ``limit`` > 0 keeps only its first ``limit`` images (by id).

    Returns counts: images, annotations, bytes of the written images.
    """
    data = json.loads(src_json.read_text())
    images: List[dict] = sorted(data["images"], key=lambda im: im["id"])
    if limit > 0:
        images = images[:limit]
    dst_images.mkdir(parents=True, exist_ok=True)
    dst_json.parent.mkdir(parents=True, exist_ok=True)
    factors: Dict[int, Tuple[float, float, Tuple[int, int]]] = {}
    new_images, written = [], 0
    for im in images:
        src = src_images / im["file_name"]
        with Image.open(src) as pil:
            pil = pil.convert("RGB")
            if pil.size != (im["width"], im["height"]):
                raise ValueError(f"{src}: decoded size {pil.size} != json ({im['width']}, {im['height']})")
            new_size = scaled_size(im["width"], im["height"], short_side)
            if new_size != pil.size:
                pil = pil.resize(new_size, Image.BILINEAR, reducing_gap=2.0)
            dst = dst_images / im["file_name"]
            pil.save(dst, "JPEG", quality=quality, optimize=True)
        written += dst.stat().st_size
        factors[im["id"]] = (new_size[0] / im["width"], new_size[1] / im["height"], new_size)
        new_images.append(dict(im, width=new_size[0], height=new_size[1]))
    annotations = [
        scale_annotation(ann, *factors[ann["image_id"]]) for ann in data["annotations"] if ann["image_id"] in factors
    ]
    info = dict(data.get("info") or {})
    info["himoe_compact"] = {"short_side": short_side, "jpeg_quality": quality, "limit": limit,
                             "source": str(src_json.name)}
    dst_json.write_text(json.dumps(dict(data, info=info, images=new_images, annotations=annotations)))
    return {"images": len(new_images), "annotations": len(annotations), "image_bytes": written}


def compact_data_root(src: Path, dst: Path, short_side: int, quality: int, limit: int = 0,
                      splits: Sequence[Tuple[str, str]] = SPLITS) -> Dict[str, Dict[str, int]]:
    """Compact every split of ``splits`` from ``src`` into ``dst``; per-split counts."""
    missing = [str(src / p) for pair in splits for p in pair if not (src / p).exists()]
    if missing:
        raise FileNotFoundError(f"bundled data missing: {missing} (set HIMOE_DATA_ROOT or pass --src)")
    return {
        json_rel: compact_split(src / json_rel, src / images_rel, dst / json_rel, dst / images_rel,
                                short_side, quality, limit)
        for json_rel, images_rel in splits
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, type=Path, help="data root holding aquarium/ and coco128/")
    parser.add_argument("--dst", required=True, type=Path, help="where the compact data root is written")
    parser.add_argument("--short-side", type=int, default=320)
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality (1-95)")
    parser.add_argument("--limit", type=int, default=0, help="keep the first N images of every split (0: all)")
    args = parser.parse_args()
    if args.short_side < 32:
        raise SystemExit(f"--short-side {args.short_side}: too small for a detector (>= 32)")
    if not 1 <= args.quality <= 95:
        raise SystemExit(f"--quality {args.quality}: must be in 1..95")
    counts = compact_data_root(args.src, args.dst, args.short_side, args.quality, args.limit)
    for split, c in counts.items():
        print(f"{split}: {c['images']} images, {c['annotations']} annotations, "
              f"{c['image_bytes'] / 2**20:.1f} MiB of JPEG")


if __name__ == "__main__":
    main()
