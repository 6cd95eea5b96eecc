"""Upcycling a dense Faster R-CNN checkpoint into HI-MoE, and expert-count mismatches."""
import pytest
import torch
from .d2_helpers import DENSE_YAML, VALID_SLICE, small_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model

from himoe_plugin.core import MoEConfigError


@pytest.fixture(scope="module")
def dense_checkpoint(registered, tmp_path_factory):
    """A dense R18-FPN Faster R-CNN (stock StandardROIHeads), saved by Detectron2's checkpointer."""
    output_dir = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    dense = build_model(small_cfg(output_dir, yaml=DENSE_YAML)).eval()
    DetectionCheckpointer(dense, str(output_dir)).save("dense")
    return dense, output_dir / "dense.pth"


def load_himoe(tmp_path, checkpoint, extra=()):
    model = build_model(small_cfg(tmp_path, extra=extra)).eval()
    DetectionCheckpointer(model).load(str(checkpoint))
    return model


def real_batch(cfg, count=2):
    loader = build_detection_test_loader(cfg, VALID_SLICE)
    return [batch[0] for batch, _ in zip(loader, range(count))]


def box_head_outputs(model, batch):
    """Class scores and box deltas of the predictor for the model's own proposals."""
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        heads = model.roi_heads
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features],
                                  [p.proposal_boxes for p in proposals])
        if hasattr(heads, "scene_in_features"):
            from himoe_plugin.core import masked_mean_pool

            scene = masked_mean_pool([features[f] for f in heads.scene_in_features], heads.scene_strides,
                                     [p.image_size for p in proposals])
            index = torch.repeat_interleave(torch.arange(len(proposals)),
                                            torch.tensor([len(p) for p in proposals]))
            box_features, routing = heads.box_head(pooled, scene, index)
            assert routing.expert_index.unique().numel() > 2  # real routing, several experts
        else:
            box_features = heads.box_head(pooled)
        return heads.box_predictor(box_features)


@pytest.mark.parametrize("shared_expert", [False, True])
def test_upcycled_model_equals_the_dense_model_at_init(dense_checkpoint, tmp_path, shared_expert):
    dense, checkpoint = dense_checkpoint
    himoe = load_himoe(tmp_path, checkpoint, ["MODEL.HIMOE.SHARED_EXPERT", str(shared_expert)])
    head = himoe.roi_heads.box_head
    expected = [
        "roi_heads.box_head.fc1.weight, roi_heads.box_head.fc1.bias -> "
        "roi_heads.box_head.moe_block.moe.experts.*.0 (8 copies)",
        "roi_heads.box_head.fc2.weight, roi_heads.box_head.fc2.bias -> "
        "roi_heads.box_head.moe_block.moe.experts.*.1 (8 copies)",
    ]
    assert all(line in head.upcycle_report for line in expected), head.upcycle_report
    assert any("shared expert" in line for line in head.upcycle_report) == shared_expert
    for e in range(8):
        assert torch.equal(head.moe_block.moe.experts.weights[0][e], dense.roi_heads.box_head.fc1.weight)
    # Everything else (backbone, RPN, predictor) loaded as is.
    dense_state, himoe_state = dense.state_dict(), himoe.state_dict()
    for key in ("backbone.bottom_up.stem.conv1.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert torch.equal(dense_state[key], himoe_state[key])

    batch = real_batch(small_cfg(tmp_path))
    for a, b in zip(box_head_outputs(dense, batch), box_head_outputs(himoe, batch)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        dense_out, himoe_out = dense(batch), himoe(batch)
    for a, b in zip(dense_out, himoe_out):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-4, atol=1e-2)
        assert (a.pred_classes == b.pred_classes).float().mean() > 0.95  # ties may swap places


def test_upcycling_noise_makes_experts_differ(dense_checkpoint, tmp_path):
    dense, checkpoint = dense_checkpoint
    head = load_himoe(tmp_path, checkpoint, ["MODEL.HIMOE.UPCYCLE_NOISE_STD", "0.05"]).roi_heads.box_head
    weights = head.moe_block.moe.experts.weights[0]
    dense_w = dense.roi_heads.box_head.fc1.weight
    assert not torch.equal(weights[0], weights[1])
    relative = (weights - dense_w).std() / dense_w.std()
    assert 0.03 < relative.item() < 0.07


def test_upcycling_into_a_different_expert_width_fails_clearly(dense_checkpoint, tmp_path):
    _, checkpoint = dense_checkpoint
    with pytest.raises(ValueError, match="cannot upcycle 'roi_heads.box_head.moe_block.moe' from the dense checkpoint"):
        load_himoe(tmp_path, checkpoint, ["MODEL.HIMOE.EXPERT_DIM", "512"])


def test_checkpoint_with_another_number_of_experts_fails_clearly(registered, tmp_path):
    eight = build_model(small_cfg(tmp_path))
    DetectionCheckpointer(eight, str(tmp_path)).save("himoe_e8")
    four = build_model(small_cfg(tmp_path, extra=["MODEL.HIMOE.NUM_EXPERTS", "4"]))
    with pytest.raises(ValueError, match=r"MODEL\.HIMOE\.NUM_EXPERTS: the checkpoint has 8 experts at "
                                         r"'roi_heads\.box_head\.moe_block\.moe' but the model is built with 4"):
        DetectionCheckpointer(four).load(str(tmp_path / "himoe_e8.pth"))


def test_checkpoint_with_another_number_of_groups_fails_clearly(registered, tmp_path):
    """Same expert count, other scene groups: fvcore would skip the shape-mismatched scene
    router with a warning and train a re-initialised router; the guard names the key."""
    four_groups = build_model(small_cfg(tmp_path))
    DetectionCheckpointer(four_groups, str(tmp_path)).save("himoe_g4")
    two_groups = build_model(small_cfg(tmp_path, extra=["MODEL.HIMOE.NUM_GROUPS", "2",
                                                        "MODEL.HIMOE.SCENE_TOP_K", "1"]))
    with pytest.raises(MoEConfigError, match=r"^MODEL\.HIMOE\.NUM_GROUPS=2: the checkpoint's router at "
                                             r"'roi_heads\.box_head\.moe_block\.router' chooses among 4"):
        DetectionCheckpointer(two_groups).load(str(tmp_path / "himoe_g4.pth"))


@pytest.mark.parametrize("saved, loaded, message", [
    (["MODEL.HIMOE.SHARED_EXPERT", "True"], [],
     r"^MODEL\.HIMOE\.SHARED_EXPERT=False: the checkpoint's MoE block at 'roi_heads\.box_head\.moe_block' "
     r"has shared expert but this model has none"),
    ([], ["MODEL.HIMOE.INSTANCE_USES_SCENE_PROBS", "False"],
     r"^MODEL\.HIMOE\.INSTANCE_USES_SCENE_PROBS=False: .* instance router that sees the scene probabilities"),
    (["MODEL.HIMOE.EXPERT_DIM", "512"], [],
     r"^MODEL\.HIMOE\.EXPERT_DIM=\[1024\]: .* experts of widths \[12544, 512, 1024\] but this model's are "
     r"\[12544, 1024, 1024\]; set it to match the checkpoint"),
], ids=["shared_expert", "instance_uses_scene_probs", "expert_dim"])
def test_checkpoint_with_another_tensor_layout_fails_naming_the_setting(registered, tmp_path, saved, loaded,
                                                                        message):
    """Settings that change which tensors an MoE block has, or their shapes: the checkpointer
    would skip those tensors with a warning and leave them random; the guard names the key."""
    DetectionCheckpointer(build_model(small_cfg(tmp_path, extra=saved)), str(tmp_path)).save("saved")
    model = build_model(small_cfg(tmp_path, extra=loaded))
    with pytest.raises(MoEConfigError, match=message):
        DetectionCheckpointer(model).load(str(tmp_path / "saved.pth"))


def test_himoe_checkpoint_round_trip_is_not_upcycled(registered, tmp_path):
    torch.manual_seed(1)
    first = build_model(small_cfg(tmp_path))
    DetectionCheckpointer(first, str(tmp_path)).save("himoe")
    second = build_model(small_cfg(tmp_path))
    DetectionCheckpointer(second).load(str(tmp_path / "himoe.pth"))
    assert second.roi_heads.box_head.upcycle_report == []
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
