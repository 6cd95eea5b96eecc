"""Register COCO-format datasets (with their supercategories) in Detectron2's catalogs."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..core import read_coco_supercategories

# name -> (annotation file, image folder), relative to the data root (see ../shared/data/README.md)
BUNDLED_DATASETS = {
    "aquarium_train": ("aquarium/annotations/instances_train.json", "aquarium/images/train"),
    "aquarium_valid": ("aquarium/annotations/instances_valid.json", "aquarium/images/valid"),
    "coco128_train": ("coco128/annotations/instances_train.json", "coco128/images"),
}


def default_data_root() -> Path:
    """``$HIMOE_DATA_ROOT``, else ``../shared/data`` next to the repository checkout."""
    env = os.environ.get("HIMOE_DATA_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """``register_coco_instances`` plus ``thing_supercategories`` metadata (idempotent).

    The supercategories (aligned with ``thing_classes``) let the scene router be supervised by
    super-classes (``MODEL.HIMOE.SCENE_SUPERVISION_WEIGHT``).
    """
    for path in (json_file, image_root):
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset '{name}': {path} does not exist")
    if name in DatasetCatalog.list():
        registered = MetadataCatalog.get(name).get("json_file")
        if os.path.abspath(registered or "") != os.path.abspath(json_file):
            raise ValueError(f"dataset '{name}' is already registered with {registered}")
        return
    with open(json_file) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    register_coco_instances(name, {}, json_file, image_root)
    metadata = MetadataCatalog.get(name)
    metadata.set(thing_classes=[c["name"] for c in categories])
    try:
        metadata.set(thing_supercategories=read_coco_supercategories(json_file))
    except ValueError:  # some category has none: super-class supervision is unavailable
        pass


def register_bundled_datasets(data_root: Optional[str] = None) -> List[str]:
    """Register ``aquarium_train``, ``aquarium_valid`` and ``coco128_train``; returns the names.

    Raises FileNotFoundError (naming the folder and ``HIMOE_DATA_ROOT``) if the data is missing.
    """
    root = Path(data_root) if data_root else default_data_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"bundled data not found at {root}: pass --data-root or set HIMOE_DATA_ROOT"
        )
    for name, (json_file, image_root) in BUNDLED_DATASETS.items():
        register_coco_dataset(name, str(root / json_file), str(root / image_root))
    return list(BUNDLED_DATASETS)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--data-root`` and ``--register NAME JSON IMAGE_DIR`` of the command-line tools."""
    parser.add_argument("--data-root", default="", help="folder of the bundled COCO-format datasets")
    parser.add_argument(
        "--register",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_DIR"),
        help="register another COCO-format dataset (repeatable)",
    )
    return parser


def register_datasets_from_args(args: argparse.Namespace) -> None:
    """The bundled datasets (if their folder exists or ``--data-root`` names it) and every
    ``--register``-ed one."""
    data_root = args.data_root or default_data_root()
    if args.data_root or os.path.isdir(data_root):
        register_bundled_datasets(data_root)
    for name, json_file, image_root in args.register or []:
        register_coco_dataset(name, json_file, image_root)
