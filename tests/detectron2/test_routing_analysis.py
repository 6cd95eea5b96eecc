"""Routing analysis, routing in predictions, the console summary and the routing pictures, on
Detectron2 checkpoints (trained by the test, or saved at random init) on real Aquarium images:
standard and cascade HI-MoE ROI heads; dense models and unknown datasets fail early."""
import csv
import json
import logging
import runpy

import matplotlib.image
import numpy as np
import pytest
import torch
from .d2_helpers import CONFIGS, DENSE_YAML, HIMOE_YAML, REPO_ROOT, SMALL_OPTS, VALID_SLICE, small_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from himoe_plugin.analysis import box_iou, expert_colors
from himoe_plugin.detectron2.analysis import routed_images
from himoe_plugin.detectron2.engine import HIMoEMetricPrinter

NUM_EXPERTS, EXPERTS_PER_GROUP = 8, 2  # the Aquarium HI-MoE config: 8 experts in 4 groups
CASCADE_YAML = CONFIGS / "aquarium" / "himoe_cascade_rcnn_R_18_FPN_aquarium.yaml"


def tool(name: str):
    return runpy.run_path(str(REPO_ROOT / "tools" / f"{name}.py"))["main"]


def random_init_checkpoint(yaml, path):
    """A checkpoint of ``yaml``'s model (small test settings) at its seeded random init."""
    torch.manual_seed(0)
    torch.save({"model": build_model(small_cfg(path.parent, yaml=yaml)).state_dict()}, path)
    return path


def trained_model(cfg, checkpoint):
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(checkpoint))
    return model.eval()


@pytest.mark.slow
def test_routing_in_predictions_is_opt_in_and_leaves_the_predictions_unchanged(himoe_checkpoint, tmp_path):
    cfg = small_cfg(tmp_path, extra=["TEST.DETECTIONS_PER_IMAGE", "50"])
    model = trained_model(cfg, himoe_checkpoint)
    assert model.roi_heads.output_routing is False  # MODEL.HIMOE.OUTPUT_ROUTING defaults to off
    batch = next(iter(build_detection_test_loader(cfg, VALID_SLICE)))
    with torch.no_grad():
        stock = model(batch)[0]["instances"]
    sample, routed, = None, None
    for sample, instances, routed in routed_images(model, [batch]):  # turns the flag on, then off
        break
    assert model.roi_heads.output_routing is False
    assert set(stock.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_experts",
                                           "pred_expert_weights"}
    assert len(instances) == len(stock) == 50
    assert torch.equal(instances.pred_boxes.tensor, stock.pred_boxes.tensor)
    assert torch.equal(instances.scores, stock.scores)
    experts, weights = instances.pred_experts, instances.pred_expert_weights
    assert experts.shape == weights.shape == (50, 2) and experts.dtype == torch.long
    # Every prediction used 2 distinct experts of its image's scene subset, best first.
    kept_groups = set(routed[0].scene_groups.tolist())
    assert all(e // EXPERTS_PER_GROUP in kept_groups for e in experts.flatten().tolist())
    assert (experts[:, 0] != experts[:, 1]).all()
    assert (weights[:, 0] >= weights[:, 1]).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(50))
    # The same experts as the RoI the prediction came from: predictions are a subset of RoI routings.
    roi_routings = {tuple(row) for row in routed[0].expert_index.tolist()}
    assert {tuple(row) for row in experts.tolist()} <= roi_routings

    cfg.defrost()
    cfg.MODEL.HIMOE.OUTPUT_ROUTING = True
    assert trained_model(cfg, himoe_checkpoint).roi_heads.output_routing is True


@pytest.mark.slow
def test_analyze_routing_tool_writes_table_metrics_and_readable_figures(himoe_checkpoint, registered, data_root,
                                                                        tmp_path, capsys):
    out = tmp_path / "routing"
    main = runpy.run_path(str(REPO_ROOT / "tools" / "analyze_routing.py"))["main"]
    paths = main([
        "detectron2", "--config-file", str(HIMOE_YAML), "--weights", str(himoe_checkpoint),
        "--dataset", VALID_SLICE, "--data-root", str(data_root), "--output-dir", str(out),
        "--vis-images", "2", *SMALL_OPTS,
    ])
    printed = capsys.readouterr().out
    assert "routing analysis of 8 images" in printed and "I(class of" not in printed
    assert "I(class; expert) = " in printed and "parameters: total" in printed

    summary = json.loads(paths["summary"].read_text())
    layer = summary["layers"]["roi_heads.box_head"]
    with open(paths["table"]) as f:
        rows = list(csv.DictReader(f))
    assert summary["images"] == 8 and len(rows) == layer["instances"] > 8 * 50
    assert {r["level"] for r in rows} <= {"P2", "P3", "P4", "P5"}
    assert {r["gt_class"] for r in rows} <= {*summary["classes"], "background"}
    # Re-derive the match of every RoI of the first image from the annotation file.
    coco = json.loads(registered["valid_slice_json"].read_text())
    first = sorted(coco["images"], key=lambda im: im["id"])[0]["id"]
    gt = [a for a in coco["annotations"] if a["image_id"] == first]
    gt_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in gt)])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    image_rows = [r for r in rows if int(r["image_id"]) == first]
    boxes = torch.tensor([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in image_rows])
    iou, match = box_iou(boxes, gt_boxes).max(dim=1)
    for row, best, index in zip(image_rows, iou.tolist(), match.tolist()):
        assert float(row["iou"]) == pytest.approx(best, abs=2e-3)
        expected = names[gt[index]["category_id"]] if best >= 0.5 else "background"
        if abs(best - 0.5) > 2e-3:
            assert row["gt_class"] == expected
    # The routing mass of the class x expert matrix is the table's weights, summed.
    assert sum(map(sum, layer["class_expert"]["mass"])) == pytest.approx(
        sum(float(r["weight_0"]) + float(r["weight_1"]) for r in rows), rel=1e-4)
    assert sum(layer["expert_load"]) == pytest.approx(1.0)
    metrics = layer["metrics"]
    assert 0.0 <= metrics["class_expert_with_background"]["nmi"] <= 1.0
    assert len(metrics["expert_class_entropy_bits"]) == NUM_EXPERTS
    parameters = summary["parameters"]
    model = build_model(small_cfg(tmp_path))
    assert parameters["total"] == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.roi_heads.box_head.moe_block.moe.experts.parameters()) // NUM_EXPERTS
    assert parameters["active_per_instance"] == parameters["total"] - (NUM_EXPERTS - 2) * expert

    for kind in ("class_expert", "size_expert", "level_expert", "scene_groups"):
        image = matplotlib.image.imread(paths[f"roi_heads.box_head_{kind}"])
        assert image.shape[0] >= 250 and image.shape[1] >= 600, kind
    examples = sorted((out / "examples").glob("*.png"))
    assert len(examples) == 2 and matplotlib.image.imread(examples[0]).shape[0] > 300


def test_console_printer_shows_a_compact_routing_line_when_statistics_are_new():
    printer = HIMoEMetricPrinter(max_iter=100)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    printer.logger.addHandler(handler)
    level = printer.logger.level
    printer.logger.setLevel(logging.INFO)  # as setup_logger() does; the test must not depend on order
    try:
        with EventStorage(start_iter=19) as storage:
            storage.put_scalars(total_loss=1.0, loss_cls=1.0, **{
                "himoe/expert_load/0": 0.75, "himoe/expert_load/1": 0.25, "himoe/load_max": 0.75,
                "himoe/load_min": 0.25, "himoe/routing_entropy": 0.5, "himoe/dropped_fraction": 0.0})
            printer.write()
            storage.iter = 39
            storage.put_scalars(total_loss=1.0, loss_cls=1.0)  # no new routing statistics
            printer.write()
    finally:
        printer.logger.removeHandler(handler)
        printer.logger.setLevel(level)
    lines = [r.getMessage() for r in records]
    assert lines.count("himoe: load max 0.750 min 0.250  routing_entropy 0.500  dropped_fraction 0.000") == 1
    assert sum("loss_cls" in line for line in lines) == 2


@pytest.mark.slow
def test_demo_command_draws_routed_predictions_on_an_image(himoe_checkpoint, registered, data_root, tmp_path):
    image = sorted((data_root / "aquarium/images/valid").glob("*.jpg"))[0]
    main = runpy.run_path(str(REPO_ROOT / "tools" / "demo_routing.py"))["main"]
    (written,) = main(["detectron2", "--config-file", str(HIMOE_YAML), "--weights", str(himoe_checkpoint),
                       "--input", str(image), "--output-dir", str(tmp_path), "--score-thresh", "0",
                       "--dataset", VALID_SLICE, *SMALL_OPTS])
    drawn, original = matplotlib.image.imread(written), matplotlib.image.imread(image)
    assert drawn.shape[:2] == original.shape[:2]
    assert abs(drawn[..., :3].astype(float) * 255 - original[..., :3].astype(float)).mean() > 0.5  # boxes drawn


def test_analyze_routing_refuses_dense_models_and_unknown_datasets_before_loading_weights(registered, data_root,
                                                                                           tmp_path):
    """Before: a dense model ran to an empty analysis (exit 0 with --vis-images 0) or an
    AttributeError; an unregistered dataset failed late on its metadata."""
    out, never_read = tmp_path / "routing", tmp_path / "never_read.pth"  # loading it would fail differently
    common = ["--weights", str(never_read), "--data-root", str(data_root), "--output-dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        tool("analyze_routing")(["detectron2", "--config-file", str(DENSE_YAML), "--dataset", VALID_SLICE,
                                 "--vis-images", "0", *common, *SMALL_OPTS])
    message = str(exit_info.value.code)
    assert "faster_rcnn_R_18_FPN_aquarium.yaml builds a dense GeneralizedRCNN without HI-MoE layers" in message
    with pytest.raises(SystemExit) as exit_info:
        tool("analyze_routing")(["detectron2", "--config-file", str(HIMOE_YAML), "--dataset", "aquarium_vaild",
                                 *common, *SMALL_OPTS])
    message = str(exit_info.value.code)
    assert "--dataset 'aquarium_vaild' is not a registered dataset" in message and "aquarium_valid" in message
    with pytest.raises(SystemExit) as exit_info:
        tool("demo_routing")(["detectron2", "--config-file", str(DENSE_YAML), "--weights", str(never_read),
                              "--input", "unused.jpg", "--output-dir", str(tmp_path / "demo"), *SMALL_OPTS])
    assert "without HI-MoE layers" in str(exit_info.value.code)
    assert not out.exists()


@pytest.mark.slow
def test_analyze_routing_on_a_cascade_records_the_rois_of_every_stage(registered, data_root, tmp_path, capsys):
    """Before: AttributeError 'InstanceMoECascadeROIHeads' object has no attribute 'output_routing'.
    Every stage routes the boxes it pools: stage 0 the proposals, later stages the boxes the
    stage before refined, with its own 8 experts inside the image's scene subset."""
    checkpoint = random_init_checkpoint(CASCADE_YAML, tmp_path / "cascade_init.pth")
    paths = tool("analyze_routing")([
        "detectron2", "--config-file", str(CASCADE_YAML), "--weights", str(checkpoint), "--dataset", VALID_SLICE,
        "--data-root", str(data_root), "--output-dir", str(tmp_path / "routing"), "--max-images", "2",
        "--vis-images", "0", *SMALL_OPTS, "MODEL.RPN.POST_NMS_TOPK_TEST", "40"])
    summary = json.loads(paths["summary"].read_text())
    assert summary["images"] == 2 and len(summary["layers"]) == 3
    with open(paths["table"]) as f:
        rows = list(csv.DictReader(f))
    stages = sorted(summary["layers"])
    boxes = {}
    for stage in stages:
        stage_rows = [r for r in rows if r["layer"] == stage]
        assert summary["layers"][stage]["instances"] == len(stage_rows) == 2 * 40
        assert summary["layers"][stage]["num_experts"] == NUM_EXPERTS
        for row in stage_rows:
            kept = {int(g) for g in row["scene_groups"].split()}
            assert len(kept) == 2 and {int(row["expert_0"]) // EXPERTS_PER_GROUP,
                                       int(row["expert_1"]) // EXPERTS_PER_GROUP} <= kept
        boxes[stage] = torch.tensor([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in stage_rows])
    # Later stages route the boxes the stage before refined, not the proposals again.
    assert not torch.allclose(boxes[stages[0]], boxes[stages[1]])
    assert "routing analysis of 2 images" in capsys.readouterr().out


@pytest.mark.slow
def test_analyze_routing_draws_cascade_predictions_coloured_by_expert(registered, data_root, tmp_path):
    """Needs the cascade ROI heads to put the routing into their predictions
    (MODEL.HIMOE.OUTPUT_ROUTING for InstanceMoECascadeROIHeads)."""
    checkpoint = random_init_checkpoint(CASCADE_YAML, tmp_path / "cascade_init.pth")
    out = tmp_path / "routing"
    tool("analyze_routing")([
        "detectron2", "--config-file", str(CASCADE_YAML), "--weights", str(checkpoint), "--dataset", VALID_SLICE,
        "--data-root", str(data_root), "--output-dir", str(out), "--max-images", "1", "--vis-images", "1",
        *SMALL_OPTS, "MODEL.RPN.POST_NMS_TOPK_TEST", "40"])
    (example,) = sorted((out / "examples").glob("*.png"))
    assert matplotlib.image.imread(example).shape[0] > 200


@pytest.mark.slow
def test_demo_says_when_no_prediction_passes_the_threshold_and_draws_the_expert_legend(registered, data_root,
                                                                                       tmp_path, capsys):
    """Before: a plain photo, no message. Now the tool prints it, the picture says it on a dark
    band at the bottom, and a legend shows the colour of every expert."""
    checkpoint = random_init_checkpoint(HIMOE_YAML, tmp_path / "himoe_init.pth")
    image = sorted((data_root / "aquarium/images/valid").glob("*.jpg"))[0]
    (written,) = tool("demo_routing")([
        "detectron2", "--config-file", str(HIMOE_YAML), "--weights", str(checkpoint), "--input", str(image),
        "--output-dir", str(tmp_path / "demo"), "--score-thresh", "1.01", "--dataset", VALID_SLICE, *SMALL_OPTS])
    assert f"{written}: no prediction with score >= 1.01" in capsys.readouterr().out
    drawn = (matplotlib.image.imread(written)[..., :3] * 255).round().astype(int)
    original = matplotlib.image.imread(image)[..., :3].astype(int)
    assert drawn.shape == original.shape
    assert drawn[-3:].max() <= 40 < original[-3:].max()  # the note's band
    size = max(10, min(drawn.shape[:2]) // 40)
    for expert, rgb in enumerate(expert_colors(NUM_EXPERTS)):  # legend swatches, top left
        top = 4 + expert * (size + 4)
        swatch = drawn[top + size // 2, 4 + size // 2]
        assert np.abs(swatch - np.round(255 * np.array(rgb))).max() <= 1, expert
