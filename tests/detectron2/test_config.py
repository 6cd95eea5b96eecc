"""Config plumbing: model-zoo inheritance, yaml == LazyConfig, clear errors for bad values."""
import pytest
import torch
from .d2_helpers import CONFIGS, HIMOE_YAML, small_cfg
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model

from himoe_plugin.core import MoEConfigError
from himoe_plugin.detectron2 import InstanceMoEROIHead, MoEConvFCBoxHead, get_himoe_cfg


def test_yaml_inherits_the_stock_model_zoo_config():
    cfg = get_himoe_cfg()
    cfg.merge_from_file(str(CONFIGS / "himoe_faster_rcnn_R_50_FPN_1x.yaml"))
    # From the stock chain (faster_rcnn_R_50_FPN_1x.yaml -> Base-RCNN-FPN.yaml):
    assert cfg.MODEL.RESNETS.DEPTH == 50 and not cfg.MODEL.MASK_ON
    assert cfg.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]
    assert cfg.SOLVER.STEPS == (60000, 80000)
    # From ours:
    assert cfg.MODEL.ROI_HEADS.NAME == "InstanceMoEROIHead"
    assert cfg.MODEL.HIMOE.NUM_GROUPS == 4


def param_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_r50_yaml_and_lazyconfig_build_the_same_model():
    cfg = get_himoe_cfg()
    cfg.merge_from_file(str(CONFIGS / "himoe_faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    from_yaml = build_model(cfg)
    lazy = LazyConfig.load(str(CONFIGS / "himoe_faster_rcnn_R_50_FPN_1x.py"))
    from_lazy = instantiate(lazy.model)
    assert param_shapes(from_yaml) == param_shapes(from_lazy)
    trainable = lambda m: {k for k, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(from_yaml) == trainable(from_lazy)
    assert from_yaml.roi_heads.box_head.moe_config == from_lazy.roi_heads.box_head.moe_config


def test_aquarium_yaml_and_lazyconfig_compute_the_same_detections(registered, tmp_path):
    cfg = small_cfg(tmp_path)
    from_yaml = build_model(cfg).eval()
    lazy = LazyConfig.load(str(CONFIGS / "aquarium" / "himoe_faster_rcnn_R_18_FPN_aquarium.py"))
    lazy.model.roi_heads.box_predictor.test_score_thresh = -1.0
    lazy.model.proposal_generator.post_nms_topk = (500, 300)
    from_lazy = instantiate(lazy.model).eval()
    assert isinstance(from_lazy.roi_heads, InstanceMoEROIHead)
    assert isinstance(from_lazy.roi_heads.box_head, MoEConvFCBoxHead)
    assert param_shapes(from_yaml) == param_shapes(from_lazy)
    from_lazy.load_state_dict(from_yaml.state_dict())
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 256, 341), dtype=torch.uint8).float()
    batch = [{"image": image, "height": 256, "width": 341}]
    with torch.no_grad():
        a, b = from_yaml(batch)[0]["instances"], from_lazy(batch)[0]["instances"]
    assert len(a) > 0
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    torch.testing.assert_close(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    # Same data and schedule as well.
    assert lazy.dataloader.train.dataset.names == cfg.DATASETS.TRAIN[0]
    assert lazy.train.max_iter == get_himoe_cfg_from(HIMOE_YAML).SOLVER.MAX_ITER


def get_himoe_cfg_from(path):
    cfg = get_himoe_cfg()
    cfg.merge_from_file(str(path))
    return cfg


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.HIMOE.TOP_K", "5"], r"MODEL\.HIMOE\.TOP_K=5: larger than the scene subset"),
        (["MODEL.HIMOE.NUM_GROUPS", "3"], r"MODEL\.HIMOE\.NUM_GROUPS=3: must divide num_experts=8"),
        (["MODEL.HIMOE.SCENE_TOP_K", "5"], r"MODEL\.HIMOE\.SCENE_TOP_K=5: the scene subset cannot"),
        (["MODEL.HIMOE.NUM_EXPERTS", "0"], r"MODEL\.HIMOE\.NUM_EXPERTS=0: must be an integer >= 1"),
        (["MODEL.HIMOE.CAPACITY_FACTOR", "-1.0"], r"MODEL\.HIMOE\.CAPACITY_FACTOR=-1\.0: must be >= 0"),
        (["MODEL.HIMOE.MOE_FC_LAYERS", "[0, 2]"], r"MODEL\.HIMOE\.MOE_FC_LAYERS=\[0, 2\]: must be increasing"),
        (["MODEL.HIMOE.MOE_FC_LAYERS", "[2]"], r"MODEL\.HIMOE\.MOE_FC_LAYERS=\[2\]: the box head has fc layers 0\.\.1"),
        (["MODEL.HIMOE.SCENE_IN_FEATURES", "['p9']"], r"MODEL\.HIMOE\.SCENE_IN_FEATURES=\['p9'\]: no feature map 'p9'"),
        (["MODEL.HIMOE.UPCYCLE_NOISE_STD", "-0.1"], r"MODEL\.HIMOE\.UPCYCLE_NOISE_STD=-0\.1: must be a finite"),
        (["MODEL.HIMOE.EXPERT_DIM", "-1"], r"MODEL\.HIMOE\.EXPERT_DIM=-1: must be an integer >= 0"),
        (["MODEL.HIMOE.STATS_PERIOD", "0"], r"MODEL\.HIMOE\.STATS_PERIOD=0: must be an integer >= 1"),
        (["MODEL.HIMOE.SCENE_SUPERVISION_WEIGHT", "0.1"],
         r"MODEL\.HIMOE\.NUM_GROUPS=4: super-class supervision needs one expert group per supercategory: "
         r"the data has 3 \(bird, fish-like, invertebrate\)"),
    ],
)
def test_invalid_himoe_values_fail_naming_the_key(registered, tmp_path, opts, message):
    cfg = small_cfg(tmp_path, extra=opts)
    with pytest.raises(MoEConfigError, match=message):
        build_model(cfg)


def test_nan_in_a_yaml_file_fails_naming_the_key(registered, tmp_path):
    yaml = tmp_path / "nan.yaml"
    yaml.write_text(f'_BASE_: "{HIMOE_YAML}"\nMODEL:\n  HIMOE:\n    UPCYCLE_NOISE_STD: .nan\n')
    cfg = small_cfg(tmp_path, yaml=yaml)
    with pytest.raises(MoEConfigError, match=r"MODEL\.HIMOE\.UPCYCLE_NOISE_STD=nan: must be a finite"):
        build_model(cfg)


def test_box_head_must_be_the_moe_head(registered, tmp_path):
    cfg = small_cfg(tmp_path, extra=["MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"])
    with pytest.raises(TypeError, match="MODEL.ROI_BOX_HEAD.NAME='MoEConvFCBoxHead'"):
        build_model(cfg)


def test_missing_himoe_keys_give_a_hint():
    from detectron2.config import get_cfg

    from himoe_plugin.detectron2 import moe_config_from_cfg

    with pytest.raises(KeyError, match="add_himoe_config"):
        moe_config_from_cfg(get_cfg())


def _stock_aquarium_lazy_model():
    from detectron2 import model_zoo

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    model.roi_heads.num_classes = 7
    model.roi_heads.mask_in_features = model.roi_heads.mask_pooler = model.roi_heads.mask_head = None
    return model


def test_lazyconfig_scene_supervision_takes_groups_from_the_datasets(registered):
    from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

    model = use_himoe_roi_heads(_stock_aquarium_lazy_model(), num_experts=6, num_groups=3, scene_top_k=2,
                                scene_supervision_weight=0.5, supervision_datasets=["aquarium_train"])
    heads = instantiate(model.roi_heads)
    # Same mapping as the yaml path (test_roi_head): bird=0, fish-like=1, invertebrate=2.
    assert heads.class_to_group.tolist() == [1, 2, 0, 0, 1, 2, 1]


def test_scene_supervision_without_class_groups_fails_instead_of_doing_nothing(registered):
    from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

    settings = dict(num_experts=6, num_groups=3, scene_top_k=2, scene_supervision_weight=0.5)
    with pytest.raises(ValueError, match="supervision_datasets"):
        use_himoe_roi_heads(_stock_aquarium_lazy_model(), **settings)
    model = use_himoe_roi_heads(_stock_aquarium_lazy_model(), supervision_datasets=["aquarium_train"],
                                **settings)
    del model.roi_heads.class_to_group  # as a hand-written LazyConfig would leave it
    with pytest.raises(MoEConfigError, match="SCENE_SUPERVISION_WEIGHT=0.5: super-class supervision needs class_to_group"):
        instantiate(model.roi_heads)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(stats_period=0), r"^stats_period=0: must be an integer >= 1"),
        (dict(expert_dim=-1), r"^expert_dim=-1: must be an integer >= 0"),
        (dict(upcycle_noise_std=float("nan")), r"^upcycle_noise_std=nan: must be a finite number >= 0"),
        (dict(upcycle_noise_std=-0.5), r"^upcycle_noise_std=-0\.5: must be a finite number >= 0"),
    ],
)
def test_lazyconfig_head_settings_fail_naming_the_setting(settings, message):
    """At config time (use_himoe_roi_heads), and again if a LazyConfig is edited afterwards
    (instantiate builds the heads, whose constructors check the same settings)."""
    from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

    with pytest.raises(MoEConfigError, match=message):
        use_himoe_roi_heads(_stock_aquarium_lazy_model(), **settings)
    model = use_himoe_roi_heads(_stock_aquarium_lazy_model())
    for name, value in settings.items():
        node = model.roi_heads if name == "stats_period" else model.roi_heads.box_head
        setattr(node, name, value)
    with pytest.raises(MoEConfigError, match=message):
        instantiate(model.roi_heads)
