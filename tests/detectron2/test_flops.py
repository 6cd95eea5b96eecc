"""Detectron2's FLOP counter (fvcore) sees exactly the compute that was dispatched."""
import pytest
import torch
from .d2_helpers import DENSE_YAML, small_cfg
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis

FC_MACS_PER_ROI = 256 * 7 * 7 * 1024 + 1024 * 1024  # fc6 + fc7 of the box head


def box_head_macs(cfg, image):
    """MACs counted in the box head of a freshly built model (same seed: same backbone/RPN)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    analysis = FlopCountAnalysis(model, [{"image": image}])
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    return {name: by_module[f"model.roi_heads.box_head{name}"] for name in ("", ".moe_block.moe", ".moe_block.router")
            if f"model.roi_heads.box_head{name}" in by_module}


@pytest.mark.parametrize("top_k", [1, 2])
def test_counted_box_head_compute_grows_with_top_k_only(registered, tmp_path, top_k):
    image = torch.randint(0, 255, (3, 256, 320), generator=torch.Generator().manual_seed(0)).float()
    dense_macs = box_head_macs(small_cfg(tmp_path, yaml=DENSE_YAML), image)[""]
    rois, remainder = divmod(dense_macs, FC_MACS_PER_ROI)
    assert remainder == 0 and rois > 10
    for num_experts, groups in ((4, 2), (16, 4)):
        macs = box_head_macs(small_cfg(tmp_path, extra=[
            "MODEL.HIMOE.TOP_K", str(top_k), "MODEL.HIMOE.NUM_EXPERTS", str(num_experts),
            "MODEL.HIMOE.NUM_GROUPS", str(groups), "MODEL.HIMOE.SCENE_TOP_K", "2",
        ]), image)
        # Experts: exactly k dense heads per RoI, whatever the number of experts ...
        assert macs[".moe_block.moe"] == top_k * dense_macs
        # ... and the routers add well under 1% (the instance router sees the pooled RoI).
        assert macs[""] == macs[".moe_block.moe"] + macs[".moe_block.router"]
        assert 0 < macs[".moe_block.router"] < 0.01 * dense_macs
