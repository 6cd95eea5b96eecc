"""Which ROI heads can run an HI-MoE box head: misuse fails at config load or build, naming the
keys, instead of crashing at iteration 0 or silently dropping cascade stages."""
import pytest
import torch
from .d2_helpers import CONFIGS, HIMOE_YAML, small_cfg
from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, Instances

from himoe_plugin.core import MoEConfigError
from himoe_plugin.detectron2 import MoEConvFCBoxHead, get_himoe_cfg
from himoe_plugin.detectron2.config import load_tool_cfg
from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

CASCADE_DENSE_YAML = CONFIGS / "aquarium" / "cascade_rcnn_R_18_FPN_aquarium.yaml"


def write_yaml(tmp_path, base, body):
    path = tmp_path / "my_config.yaml"
    path.write_text(f'_BASE_: "{base}"\n{body}')
    return str(path)


@pytest.mark.parametrize("base", [
    "model_zoo://Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", str(CASCADE_DENSE_YAML),
], ids=["model-zoo", "own-chain"])
def test_single_stage_himoe_heads_over_a_cascade_config_fail_naming_the_key(tmp_path, base):
    path = write_yaml(tmp_path, base, "MODEL:\n  ROI_HEADS: {NAME: InstanceMoEROIHead}\n"
                                      "  ROI_BOX_HEAD: {NAME: MoEConvFCBoxHead}\n")
    with pytest.raises(MoEConfigError, match=r"MODEL\.ROI_HEADS\.NAME='InstanceMoEROIHead': .* replaces "
                       r"the cascade ROI heads 'CascadeROIHeads' of .*cascade.*other cascade stages "
                       r"would be dropped: set MODEL\.ROI_HEADS\.NAME='InstanceMoECascadeROIHeads'"):
        get_himoe_cfg().merge_from_file(path)


def test_single_stage_himoe_heads_given_on_the_command_line_over_a_cascade_config_fail():
    with pytest.raises(MoEConfigError, match=r"MODEL\.ROI_HEADS\.NAME='InstanceMoEROIHead': the command "
                       r"line replaces the cascade ROI heads 'CascadeROIHeads'"):
        load_tool_cfg(str(CASCADE_DENSE_YAML), ["MODEL.ROI_HEADS.NAME", "InstanceMoEROIHead",
                                                 "MODEL.ROI_BOX_HEAD.NAME", "MoEConvFCBoxHead"])


def test_stock_configs_keep_loading():
    """Stock ROI heads (with stock box heads) are none of the plugin's business."""
    cfg = load_tool_cfg(str(CASCADE_DENSE_YAML), ["MODEL.ROI_HEADS.NAME", "StandardROIHeads"])
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"


@pytest.mark.parametrize("heads, hint", [
    ("StandardROIHeads", "InstanceMoEROIHead"),
    ("CascadeROIHeads", "InstanceMoECascadeROIHeads"),
])
def test_moe_box_head_under_stock_roi_heads_fails_at_build_naming_both_keys(registered, tmp_path, heads, hint):
    cfg = small_cfg(tmp_path, extra=["MODEL.ROI_HEADS.NAME", heads, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"])
    message = (rf"MODEL\.ROI_BOX_HEAD\.NAME='MoEConvFCBoxHead': MODEL\.ROI_HEADS\.NAME='{heads}' cannot feed "
               rf"an HI-MoE box head .* set MODEL\.ROI_HEADS\.NAME='{hint}'")
    with pytest.raises(MoEConfigError, match=message):
        build_model(cfg)
    with pytest.raises(MoEConfigError, match=message):  # the tools fail before building anything
        load_tool_cfg(str(HIMOE_YAML), ["MODEL.ROI_HEADS.NAME", heads])


def test_himoe_roi_heads_with_a_stock_box_head_fail_in_the_tools_naming_both_keys():
    with pytest.raises(MoEConfigError, match=r"MODEL\.ROI_BOX_HEAD\.NAME='FastRCNNConvFCHead': "
                       r"MODEL\.ROI_HEADS\.NAME='InstanceMoEROIHead' needs an HI-MoE box head"):
        load_tool_cfg(str(HIMOE_YAML), ["MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"])


def test_lazyconfig_helper_follows_the_lsj_4conv1fc_head():
    """The stock ``new_baselines`` LSJ Mask R-CNN (4 convs and one fc in the box head, SyncBN):
    the fc becomes the experts, the convs (and their norm) stay."""
    model = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py").model
    use_himoe_roi_heads(model, num_experts=4, top_k=1, num_groups=2, scene_top_k=1)
    torch.manual_seed(0)
    built = instantiate(model).eval()
    head = built.roi_heads.box_head
    assert isinstance(head, MoEConvFCBoxHead) and head.moe_fc_layers == [0]
    assert len(head.convs) == 4 and not head.fcs_before and not head.fcs_after
    assert head.moe_block.moe.experts.weights[0].shape == (4, 1024, 256 * 7 * 7)
    image = torch.randint(0, 255, (3, 192, 256), generator=torch.Generator().manual_seed(0)).float()
    built.roi_heads.box_predictor.test_score_thresh = 0.0
    with torch.no_grad():
        instances = built([{"image": image, "height": 192, "width": 256}])[0]["instances"]
    assert len(instances) > 0 and instances.pred_masks.shape[1:] == (192, 256)


def test_lazyconfig_helper_rejects_expert_layers_the_head_does_not_have():
    model = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py").model
    with pytest.raises(MoEConfigError, match=r"moe_fc_layers=\[0, 1\]: the box head has fc layers 0\.\.0"):
        use_himoe_roi_heads(model, moe_fc_layers=[0, 1])


def test_lazyconfig_moe_box_head_under_stock_roi_heads_fails_naming_what_to_set():
    """No build-time view of the parent in a LazyConfig: the first call fails, before any
    routing, instead of a TypeError about missing arguments."""
    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    model.roi_heads.mask_in_features = model.roi_heads.mask_pooler = model.roi_heads.mask_head = None
    use_himoe_roi_heads(model, num_experts=4, top_k=1, num_groups=2, scene_top_k=1)
    model.roi_heads._target_ = StandardROIHeads  # as a hand-edited config might leave it
    for key in ("scene_in_features", "scene_strides", "stats_period"):
        del model.roi_heads[key]
    heads = instantiate(model.roi_heads).eval()
    features = {f"p{i}": torch.randn(1, 256, 64 // 2 ** (i - 2), 64 // 2 ** (i - 2)) for i in range(2, 7)}
    proposals = Instances((256, 256), proposal_boxes=Boxes(torch.tensor([[10., 10., 90., 120.]])),
                          objectness_logits=torch.zeros(1))
    with pytest.raises(MoEConfigError, match=r"box_head='MoEConvFCBoxHead': an HI-MoE box head runs "
                                             r"only under HI-MoE ROI heads .*RoI features only"):
        heads(None, features, [proposals])


@pytest.mark.parametrize("heads", ["InstanceMoEROIHead", "Res5ROIHeads"])
def test_c4_models_fail_saying_they_are_not_supported_and_what_is(tmp_path, heads):
    path = write_yaml(tmp_path, "model_zoo://COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", "")
    with pytest.raises(MoEConfigError, match=r"C4 models \(Res5ROIHeads.*\) are not supported.* HI-MoE "
                       r"supports the StandardROIHeads family .*InstanceMoEROIHead.* CascadeROIHeads"):
        load_tool_cfg(path, ["MODEL.ROI_HEADS.NAME", heads, "MODEL.ROI_BOX_HEAD.NAME", "MoEConvFCBoxHead"])
