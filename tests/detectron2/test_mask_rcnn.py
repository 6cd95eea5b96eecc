"""HI-MoE Mask R-CNN (Detectron2): trains on COCO128 polygon masks, evaluates boxes and masks,
predicts stock Instances with masks; the R50 yaml and LazyConfig build the same model."""
import math

import pytest
import torch
from .d2_helpers import COCO128_SLICE, CONFIGS, small_cfg
from detectron2.config import LazyConfig, instantiate
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model

from himoe_plugin.detectron2 import InstanceMoEROIHead, MoEConvFCBoxHead, get_himoe_cfg
from himoe_plugin.detectron2.engine import HIMoETrainer

MASK_YAML = CONFIGS / "coco128" / "himoe_mask_rcnn_R_18_FPN_coco128.yaml"


@pytest.fixture(scope="module")
def trained_mask(registered, tmp_path_factory):
    """3 iterations on COCO128 (masks), then COCO evaluation (bbox + segm) of an 8-image slice."""
    output_dir = tmp_path_factory.mktemp("d2_mask")
    cfg = small_cfg(output_dir, yaml=MASK_YAML, extra=[
        "SOLVER.MAX_ITER", "3", "DATASETS.TEST", f"('{COCO128_SLICE}',)", "MODEL.HIMOE.STATS_PERIOD", "1",
    ])
    trainer = HIMoETrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return {"cfg": cfg, "trainer": trainer, "results": HIMoETrainer.test(cfg, trainer.model)}


def test_mask_rcnn_trains_the_mask_head_with_routing_losses(trained_mask):
    storage = trained_mask["trainer"].storage
    for key in ("loss_mask", "loss_cls", "loss_box_reg", "loss_moe_balance", "loss_moe_z"):
        values = [v for v, _ in storage.history(key).values()]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), key
    assert [it for _, it in storage.history("himoe/expert_load/0").values()] == [0, 1, 2]


def test_mask_rcnn_evaluates_boxes_and_masks(trained_mask):
    results = trained_mask["results"]
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert all(math.isfinite(results[task][key]) for key in ("AP", "AP50", "AP75")), task


def test_mask_rcnn_predicts_masks_of_its_boxes(trained_mask):
    model = trained_mask["trainer"].model.eval()
    batch = next(iter(build_detection_test_loader(trained_mask["cfg"], COCO128_SLICE)))
    with torch.no_grad():
        instances = model(batch)[0]["instances"]
    assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    assert len(instances) > 0
    height, width = batch[0]["height"], batch[0]["width"]
    assert instances.pred_masks.shape == (len(instances), height, width)
    assert instances.pred_masks.dtype == torch.bool
    # Every mask is pasted inside its own box (Detectron2 pastes the 28x28 mask into the box).
    boxes = instances.pred_boxes.tensor
    for mask, (x0, y0, x1, y1) in zip(instances.pred_masks, boxes.tolist()):
        ys, xs = mask.nonzero(as_tuple=True)
        if len(ys):
            assert xs.min() >= math.floor(x0) - 1 and xs.max() <= math.ceil(x1)
            assert ys.min() >= math.floor(y0) - 1 and ys.max() <= math.ceil(y1)


def test_r50_mask_yaml_and_lazyconfig_build_the_same_model():
    cfg = get_himoe_cfg()
    cfg.merge_from_file(str(CONFIGS / "himoe_mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    assert cfg.MODEL.MASK_ON and cfg.MODEL.RESNETS.DEPTH == 50
    from_yaml = build_model(cfg)
    from_lazy = instantiate(LazyConfig.load(str(CONFIGS / "himoe_mask_rcnn_R_50_FPN_1x.py")).model)
    for model in (from_yaml, from_lazy):
        assert isinstance(model.roi_heads, InstanceMoEROIHead)
        assert isinstance(model.roi_heads.box_head, MoEConvFCBoxHead)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(from_yaml) == shapes(from_lazy)
    assert any(k.startswith("roi_heads.mask_head.") for k in shapes(from_yaml))
    assert from_yaml.roi_heads.box_head.moe_config == from_lazy.roi_heads.box_head.moe_config
