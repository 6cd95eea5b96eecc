"""Box-head checkpoints written before ``MoEBlock`` (keys ``router.*``, ``moe.*``) still load,
into both frameworks' heads, and reproduce the outputs saved with them."""
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

from make_legacy_box_heads import ROUTER, detectron2_head, mmdet_head  # noqa: E402

from himoe_plugin.core import MoEConfigError  # noqa: E402

LEGACY = torch.load(FIXTURES / "legacy_box_heads.pth")


def _load_strictly(head, state_dict):
    head.load_state_dict(dict(state_dict))  # strict: every legacy key lands somewhere
    return head.eval()


def test_detectron2_head_loads_a_pre_block_checkpoint_and_reproduces_its_output():
    saved = LEGACY["detectron2"]
    assert any(k.startswith("router.") for k in saved["state_dict"])
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    head = _load_strictly(detectron2_head(), saved["state_dict"])
    assert torch.equal(head.moe_block.moe.experts.weights[0], saved["state_dict"]["moe.experts.weights.0"])
    batch = LEGACY["inputs"]
    with torch.no_grad():
        out, _ = head(batch["rois"], batch["scene"], batch["image_index"])
    torch.testing.assert_close(out, saved["output"], rtol=1e-6, atol=1e-6)


def test_mmdet_head_loads_a_pre_block_checkpoint_and_reproduces_its_output():
    saved = LEGACY["mmdet"]
    head = _load_strictly(mmdet_head(), saved["state_dict"])
    assert torch.equal(head.moe_block.router.scene_router.weight,
                       saved["state_dict"]["router.scene_router.weight"])
    batch = LEGACY["inputs"]
    with torch.no_grad():
        cls_score, bbox_pred, _ = head(batch["rois"], batch["scene"], batch["image_index"])
    torch.testing.assert_close(cls_score, saved["cls_score"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bbox_pred, saved["bbox_pred"], rtol=1e-6, atol=1e-6)


#: The fixture's heads route among 2 groups; these settings among 4 (as many as experts).
FOUR_GROUPS = dict(ROUTER, num_groups=0, scene_top_k=2)


def test_a_pre_block_detectron2_checkpoint_with_another_group_count_fails_naming_the_key():
    """Legacy checkpoints hold no group-count record: the scene router's shape tells it (before,
    Detectron2 failed on a bare size mismatch)."""
    from detectron2.layers import ShapeSpec

    from himoe_plugin.core import MoEConfig
    from himoe_plugin.detectron2 import MoEConvFCBoxHead

    head = MoEConvFCBoxHead(ShapeSpec(channels=8, height=2, width=2), conv_dims=[], fc_dims=[16, 16],
                            moe_config=MoEConfig(shared_expert=True, **FOUR_GROUPS))
    with pytest.raises(MoEConfigError, match=r"^MODEL\.HIMOE\.NUM_GROUPS=0: the checkpoint's router at "
                                             r"'moe_block\.router' chooses among 2 expert groups"):
        head.load_state_dict(dict(LEGACY["detectron2"]["state_dict"]), strict=False)


def test_a_pre_block_mmdet_checkpoint_with_another_group_count_fails_naming_the_key():
    """Before, MMDetection's non-strict loading skipped the routers and left them random."""
    from himoe_plugin.mmdet import MoEShared2FCBBoxHead

    head = MoEShared2FCBBoxHead(in_channels=8, roi_feat_size=2, fc_out_channels=16, num_classes=3,
                                shared_expert=True, router=dict(type='HierarchicalRouter', **FOUR_GROUPS))
    with pytest.raises(MoEConfigError, match=r"^roi_head\.bbox_head\.router\.num_groups=0: the checkpoint's "
                                             r"router at 'moe_block\.router' chooses among 2"):
        head.load_state_dict(dict(LEGACY["mmdet"]["state_dict"]), strict=False)
