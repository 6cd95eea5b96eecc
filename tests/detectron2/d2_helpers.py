"""Helpers for the Detectron2 tests: small HI-MoE configs on the bundled Aquarium data."""
import json
import sys
from pathlib import Path

from himoe_plugin.detectron2 import get_himoe_cfg

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs" / "detectron2"
HIMOE_YAML = CONFIGS / "aquarium" / "himoe_faster_rcnn_R_18_FPN_aquarium.yaml"
DENSE_YAML = CONFIGS / "aquarium" / "faster_rcnn_R_18_FPN_aquarium.yaml"
VALID_SLICE = "aquarium_valid_slice8"
COCO128_SLICE = "coco128_slice8"  # the first 8 COCO128 images, with their polygon masks
LAZYCONFIG_TOOL = Path(sys.prefix) / "share" / "detectron2" / "tools" / "lazyconfig_train_net.py"

# CPU-sized: short side 256, few proposals at test time, no data-loader workers.
SMALL_OPTS = [
    "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(256,)",
    "INPUT.MAX_SIZE_TRAIN", "427",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "300",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.MAX_ITER", "4",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "MODEL.HIMOE.STATS_PERIOD", "2",
    "TEST.EVAL_PERIOD", "0",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "-1.0",  # keep detections of a 4-iteration model
]


def write_slice(data_root: Path, out_json: Path, num_images: int = 8,
                source: str = "aquarium/annotations/instances_valid.json") -> Path:
    """A COCO json with the first ``num_images`` images of ``source`` (and their annotations)."""
    full = json.loads((data_root / source).read_text())
    images = sorted(full["images"], key=lambda im: im["id"])[:num_images]
    keep = {im["id"] for im in images}
    sliced = dict(full, images=images, annotations=[a for a in full["annotations"] if a["image_id"] in keep])
    out_json.write_text(json.dumps(sliced))
    return out_json


def small_cfg(output_dir, yaml=HIMOE_YAML, extra=()):
    cfg = get_himoe_cfg()
    cfg.merge_from_file(str(yaml))
    cfg.merge_from_list(SMALL_OPTS + ["OUTPUT_DIR", str(output_dir), "DATASETS.TEST", f"('{VALID_SLICE}',)"])
    cfg.merge_from_list(list(extra))
    return cfg
