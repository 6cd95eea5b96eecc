"""InstanceMoECascadeROIHeads: three HI-MoE stages trained and evaluated with tools/train_net.py,
route-once (scene / instance) reuse tracked through the box refinement, per-stage statistics,
the stock cascade configs edited per the docs, clear errors."""
import json
import subprocess
import sys

import pytest
import torch
from .d2_helpers import CONFIGS, REPO_ROOT, SMALL_OPTS, VALID_SLICE, small_cfg
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import EventStorage
from ..module_state import attribute_writes
from .test_roi_head import make_inputs

from himoe_plugin.core import MoEConfigError
from himoe_plugin.detectron2 import InstanceMoECascadeROIHeads, MoEConvFCBoxHead, get_himoe_cfg

CASCADE_YAML = CONFIGS / "aquarium" / "himoe_cascade_rcnn_R_18_FPN_aquarium.yaml"
STAGES = ("stage0", "stage1", "stage2")
ROUTING_LOSSES = ("loss_moe_balance", "loss_moe_scene_balance", "loss_moe_z")


@pytest.mark.slow
def test_train_net_trains_and_evaluates_all_three_stages(registered, data_root, tmp_path):
    """The stock Cascade Mask R-CNN yaml edited per the docs, through tools/train_net.py."""
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", str(CASCADE_YAML),
        "--data-root", str(data_root), "--register", VALID_SLICE, str(registered["valid_slice_json"]),
        str(data_root / "aquarium/images/valid"),
    ] + SMALL_OPTS + [
        "SOLVER.MAX_ITER", "2", "MODEL.HIMOE.STATS_PERIOD", "1", "OUTPUT_DIR", str(tmp_path),
        "DATASETS.TEST", f"('{VALID_SLICE}',)", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    last = [r for r in records if "total_loss" in r][-1]
    for stage in range(3):
        for name in ("loss_cls", "loss_box_reg", *ROUTING_LOSSES):
            assert f"{name}_stage{stage}" in last, (name, stage)
        loads = [last[f"himoe/stage{stage}/expert_load/{e}"] for e in range(8)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-4)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in (tmp_path / "log.txt").read_text()


@pytest.fixture
def heads_of(registered, tmp_path):
    def build(route_once, **opts):
        extra = ["MODEL.HIMOE.ROUTE_ONCE", route_once, "MODEL.HIMOE.STATS_PERIOD", "1"]
        for key, value in opts.items():
            extra += [key, value]
        torch.manual_seed(0)
        return build_model(small_cfg(tmp_path, yaml=CASCADE_YAML, extra=extra)).roi_heads
    return build


def stage_routings(heads):
    """Capture the routing every stage's box head returns."""
    captured = []
    handles = [head.register_forward_hook(lambda m, i, o: captured.append(o[1])) for head in heads.box_head]
    return captured, handles


def run_heads(heads, training, seed=0):
    images, features, proposals, targets = make_inputs(heads, [30, 45], [3, 2], seed=seed)
    features = {k: v[:, :128] for k, v in features.items()}  # the CPU cascade has a 128-channel FPN
    captured, handles = stage_routings(heads)
    heads.train(training)
    with EventStorage(0) as storage:
        if training:
            _, outputs = heads(images, features, proposals, targets)
        else:
            with torch.no_grad():
                outputs, _ = heads(images, features, proposals)
    for handle in handles:
        handle.remove()
    return outputs, captured, storage


@pytest.mark.parametrize("route_once", ["", "scene", "instance"])
def test_every_parameter_trains_and_stage_losses_and_statistics_follow_who_routed(heads_of, route_once):
    heads = heads_of(route_once)
    losses, routings, storage = run_heads(heads, training=True)
    assert len(routings) == 3
    total = sum(losses.values())
    total.backward()
    for name, param in heads.named_parameters():  # nothing unused: DDP needs no find_unused_parameters
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    routed = {"": STAGES, "scene": STAGES, "instance": STAGES[:1]}[route_once]
    for stage in STAGES:
        has = {name for name in ROUTING_LOSSES if f"{name}_{stage}" in losses}
        expected = set()
        if stage in routed:
            expected = set(ROUTING_LOSSES) if stage == "stage0" or not route_once else {"loss_moe_balance", "loss_moe_z"}
        assert has == expected, (stage, has)
        assert (f"himoe/{stage}/expert_load/0" in storage.histories()) == (stage in routed)


def test_route_once_scene_routes_every_stage_inside_stage0_subsets(heads_of):
    heads = heads_of("scene")
    for head in heads.box_head[1:]:
        assert head.moe_block.router.scene_router is None
    _, routings, _ = run_heads(heads, training=False)
    first = routings[0]
    for later in routings[1:]:
        assert later.scene is first.scene
        image_index = torch.repeat_interleave(torch.arange(2), torch.tensor([30, 45]))
        assert later.eligible[image_index].gather(1, later.expert_index).all()


def test_route_once_instance_reuses_stage0_routing_at_inference(heads_of):
    heads = heads_of("instance")
    assert all(not list(h.moe_block.router.parameters()) for h in heads.box_head[1:])
    outputs, routings, _ = run_heads(heads, training=False)
    assert routings[1] is routings[0] and routings[2] is routings[0]  # routed once, no copies
    assert all(len(o) > 0 for o in outputs)


def test_route_once_instance_tracks_rois_through_the_refinement_in_training(heads_of, monkeypatch):
    """Training drops the empty boxes a stage predicts; every RoI the next stage keeps still
    uses the experts stage 0 chose for the proposal it was refined from."""
    heads = heads_of("instance")
    predict = heads.box_predictor[0].predict_boxes
    emptied = {}

    def with_empty_boxes(predictions, proposals):
        boxes = [b.clone() for b in predict(predictions, proposals)]
        for image, rows in ((0, [0, 5]), (1, [7])):
            boxes[image][rows, 2] = boxes[image][rows, 0]  # zero width
        emptied["rows"] = [0, 5, len(boxes[0]) + 7]
        emptied["count"] = sum(len(b) for b in boxes)
        return boxes

    monkeypatch.setattr(heads.box_predictor[0], "predict_boxes", with_empty_boxes)
    _, routings, _ = run_heads(heads, training=True)
    kept = torch.tensor([r for r in range(emptied["count"]) if r not in emptied["rows"]])
    assert routings[1].expert_index.shape[0] == len(kept)
    assert torch.equal(routings[1].expert_index, routings[0].expert_index[kept])
    assert torch.equal(routings[1].combine_weight, routings[0].combine_weight[kept])


def test_nonempty_rows_are_the_rows_create_proposals_keeps(heads_of):
    from himoe_plugin.detectron2.cascade import nonempty_rows

    heads = heads_of("instance").train()
    boxes = [torch.tensor([[0., 0., 10., 10.], [5., 5., 5., 9.], [300., 0., 400., 9.]]),
             torch.tensor([[1., 1., 20., 30.]])]
    proposals = heads._create_proposals_from_boxes(boxes, [(100, 200), (100, 200)])
    # Row 1 has zero width, row 2 lies outside the 200-wide image: dropped like the stock heads do.
    assert nonempty_rows(boxes, [(100, 200), (100, 200)]).tolist() == [0, 3]
    assert [len(p) for p in proposals] == [1, 1]


def test_r50_cascade_yaml_and_lazyconfig_build_the_same_model():
    cfg = get_himoe_cfg()
    cfg.merge_from_file(str(CONFIGS / "himoe_cascade_mask_rcnn_R_50_FPN_1x.yaml"))
    lazy = LazyConfig.load(str(CONFIGS / "himoe_cascade_mask_rcnn_R_50_FPN_1x.py"))
    with torch.device("meta"):  # shapes only: three R50 box heads with 8 experts each
        from_yaml = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
        from_lazy = instantiate(lazy.model)
    for model in (from_yaml, from_lazy):
        assert isinstance(model.roi_heads, InstanceMoECascadeROIHeads)
        assert len(model.roi_heads.box_head) == 3
        assert all(isinstance(h, MoEConvFCBoxHead) for h in model.roi_heads.box_head)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(from_yaml) == shapes(from_lazy)
    assert shapes(from_yaml)["roi_heads.box_head.2.moe_block.moe.experts.weights.0"] == (8, 1024, 256 * 49)
    assert any(k.startswith("roi_heads.mask_head.") for k in shapes(from_yaml))


@pytest.mark.parametrize("opts, error, message", [
    (["MODEL.HIMOE.ROUTE_ONCE", "stage"], MoEConfigError,
     r"MODEL\.HIMOE\.ROUTE_ONCE='stage': must be one of \('', 'scene', 'instance'\)"),
    (["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "False"], MoEConfigError,
     r"MODEL\.ROI_BOX_HEAD\.CLS_AGNOSTIC_BBOX_REG=False: cascade ROI heads regress class-agnostic"),
    (["MODEL.ROI_HEADS.NAME", "InstanceMoEROIHead", "MODEL.HIMOE.ROUTE_ONCE", "scene"], MoEConfigError,
     r"MODEL\.HIMOE\.ROUTE_ONCE='scene': only cascade ROI heads route once .* has one stage"),
])
def test_bad_cascade_settings_fail_naming_the_key(registered, tmp_path, opts, error, message):
    with pytest.raises(error, match=message):
        build_model(small_cfg(tmp_path, yaml=CASCADE_YAML, extra=opts))


def test_lazyconfig_route_once_needs_a_cascade():
    from detectron2 import model_zoo

    from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    with pytest.raises(MoEConfigError, match=r"route_once='instance': only cascade ROI heads"):
        use_himoe_roi_heads(model, route_once="instance")
    cascade = use_himoe_roi_heads(model_zoo.get_config("common/models/cascade_rcnn.py").model,
                                  num_experts=4, top_k=1, num_groups=2, scene_top_k=1, route_once="instance")
    assert cascade.roi_heads.route_once == "instance" and len(cascade.roi_heads.box_heads) == 3
    stds = [head.box2box_transform.weights for head in cascade.roi_heads.box_predictors]
    assert stds == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]  # stages keep their predictors


@pytest.mark.parametrize("route_once", ["", "instance"])
def test_a_pass_keeps_nothing_on_the_heads_and_batches_do_not_interact(heads_of, route_once):
    heads = heads_of(route_once, **{"MODEL.HIMOE.OUTPUT_ROUTING": "True"}).eval()
    with attribute_writes(heads) as writes:
        first, _, _ = run_heads(heads, training=False, seed=1)
        second, _, _ = run_heads(heads, training=False, seed=2)
    assert writes == []
    alone, _, _ = run_heads(heads_of(route_once, **{"MODEL.HIMOE.OUTPUT_ROUTING": "True"}).eval(),
                            training=False, seed=2)
    for after, fresh in zip(second, alone):
        for field in ("scores", "pred_classes", "pred_experts", "pred_expert_weights"):
            assert torch.equal(after.get(field), fresh.get(field)), field


@pytest.mark.parametrize("route_once", ["", "scene", "instance"])
def test_output_routing_gives_each_prediction_the_last_stage_routing_of_its_roi(heads_of, route_once):
    """MODEL.HIMOE.OUTPUT_ROUTING on a cascade (the routing analysis tool needs it): every
    prediction carries the experts and weights the last stage gave one of its image's RoIs."""
    heads = heads_of(route_once, **{"MODEL.HIMOE.OUTPUT_ROUTING": "True"})
    heads.box_predictor[-1].test_score_thresh = 0.0
    outputs, routings, _ = run_heads(heads, training=False)
    last, counts = routings[-1], [30, 45]
    top_k = heads.box_head[-1].moe_config.top_k
    for image, instances in enumerate(outputs):
        assert len(instances) > 0
        experts, weights = instances.pred_experts, instances.pred_expert_weights
        assert experts.dtype == torch.long and experts.shape == (len(instances), top_k)
        assert weights.dtype == torch.float32 and weights.shape == experts.shape
        rows = slice(sum(counts[:image]), sum(counts[:image + 1]))
        image_experts, image_weights = last.expert_index[rows], last.combine_weight[rows]
        for e, w in zip(experts, weights):
            match = (image_experts == e).all(1) & (image_weights == w).all(1)
            assert match.any()
    heads.output_routing = False
    plain, _, _ = run_heads(heads, training=False)
    assert set(plain[0].get_fields()) == {"pred_boxes", "scores", "pred_classes"}
