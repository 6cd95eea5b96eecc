"""The model sizes docs/detectron2.md states for the Aquarium configs of both frameworks (why the
Detectron2 HI-MoE model is larger than its MMDetection twin, and the overrides that align them)."""
import re
from pathlib import Path

from detectron2.modeling import build_model
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

import himoe_plugin.mmdet  # noqa: F401  (registers the modules)
from himoe_plugin.detectron2.config import load_tool_cfg

REPO_ROOT = Path(__file__).resolve().parents[1]
D2_YAML = REPO_ROOT / "configs/detectron2/aquarium/himoe_faster_rcnn_R_18_FPN_aquarium.yaml"
MM_CONFIG = REPO_ROOT / "configs/mmdet/aquarium/himoe-faster-rcnn_r18_fpn_aquarium_cpu.py"
MMDET_SIZED = ["MODEL.FPN.OUT_CHANNELS", "128", "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
               "MODEL.HIMOE.NUM_EXPERTS", "6", "MODEL.HIMOE.NUM_GROUPS", "3"]


def millions(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


def test_documented_sizes_of_the_aquarium_configs_hold():
    section = (REPO_ROOT / "docs/detectron2.md").read_text().split("### Model size of the Aquarium configs")[1]
    section = section.split("\n## ")[0]
    stated = [float(v) for v in re.findall(r"([0-9]+\.[0-9]) M\b", section)]
    d2 = build_model(load_tool_cfg(str(D2_YAML), ["MODEL.DEVICE", "cpu"]))
    d2_small = build_model(load_tool_cfg(str(D2_YAML), ["MODEL.DEVICE", "cpu", *MMDET_SIZED]))
    init_default_scope("mmdet")
    mm = MODELS.build(Config.fromfile(str(MM_CONFIG)).model)
    experts = sum(p.numel() for p in d2.roi_heads.box_head.moe_block.moe.experts.parameters())
    assert round(experts / 8 / 1e6, 1) == 13.9 and round(experts / 1e6) == 111
    assert millions(d2) in stated and millions(mm) in stated and millions(d2_small) in stated
    # The overrides give the MMDetection twin's box head: the same expert tensors.
    mm_experts = mm.roi_head.bbox_head.moe_block.moe.experts.weights
    d2_experts = d2_small.roi_heads.box_head.moe_block.moe.experts.weights
    assert [tuple(w.shape) for w in d2_experts] == [tuple(w.shape) for w in mm_experts]
    assert abs(millions(d2_small) - millions(mm)) < 0.5
