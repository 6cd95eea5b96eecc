"""The framework-agnostic routing analysis: matching, metrics, table, figures; prediction routing;
the compact statistics summary."""
import csv
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch

from himoe_plugin.analysis import (BACKGROUND, ImageTruth, LayerInfo, RoutedInstances, RoutingAnalysis,
                                   RoutingTable, format_metrics, mutual_information_bits, specialization)
from himoe_plugin.core import (HierarchicalRouter, MoEBlock, MoEConfig, collect_routing_statistics,
                               format_routing_summary, routing_of_predictions)

CLASSES = ["fish", "shark", "penguin"]


def routed(boxes, experts, weights, groups=(0, 1), levels=None, layer="box_head"):
    return RoutedInstances(layer, torch.tensor(boxes, dtype=torch.float32), torch.tensor(experts),
                           torch.tensor(weights, dtype=torch.float32), torch.tensor(groups), levels)


def test_specialization_is_one_for_a_one_to_one_map_and_zero_for_independence():
    diagonal = np.diag([10.0, 20.0, 30.0])
    assert specialization(diagonal)["nmi"] == pytest.approx(1.0)
    p = np.array([10, 20, 30]) / 60
    assert specialization(diagonal)["mi_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    independent = np.outer([1.0, 3.0], [2.0, 2.0, 4.0])
    assert mutual_information_bits(independent) == pytest.approx(0.0, abs=1e-12)
    assert specialization(np.zeros((2, 3))) == {"mi_bits": 0.0, "nmi": 0.0}


def test_table_matches_ground_truth_by_iou_and_buckets_sizes():
    truth = ImageTruth(7, torch.tensor([[0.0, 0.0, 90.0, 90.0], [200.0, 200.0, 220.0, 220.0]]),
                       torch.tensor([1, 2]))
    table = RoutingTable(CLASSES)
    table.add(truth, routed(
        [[0, 0, 81, 90],           # IoU 0.9 with the shark (90 x 90: medium)
         [200, 200, 219, 221],     # IoU ~0.9 with the small penguin (20 x 20)
         [0, 0, 40, 40],           # IoU 0.2: background, its own size (40 x 40: medium)
         [300, 300, 700, 700]],    # no overlap: background, large
        [[3, 1], [0, 2], [5, 4], [2, 3]], [[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [1.0, 0.0]],
        levels=["P3", "P2", "P2", "P5"]))
    rows = table.rows
    assert [r["gt_class"] for r in rows] == ["shark", "penguin", BACKGROUND, BACKGROUND]
    assert [r["size"] for r in rows] == ["medium", "small", "medium", "large"]
    assert rows[0]["iou"] == pytest.approx(0.9)
    assert [(r["expert_0"], r["weight_0"], r["expert_1"]) for r in rows][0] == (3, 0.7, 1)
    assert [r["level"] for r in rows] == ["P3", "P2", "P2", "P5"]
    assert {r["scene_groups"] for r in rows} == {"0 1"}
    assert table.columns[-4:] == ["expert_0", "weight_0", "expert_1", "weight_1"]


def test_analysis_sums_routing_mass_and_scene_usage_and_writes_readable_outputs(tmp_path):
    layers = {"box_head": LayerInfo(num_experts=4, num_groups=2)}
    analysis = RoutingAnalysis(CLASSES, layers, supercategories=["fish-like", "fish-like", "bird"])
    fish = ImageTruth(1, torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([0]))
    penguin = ImageTruth(2, torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([2]))
    # Fish RoIs always go to expert 0 (+1), penguin RoIs to expert 2 (+3): perfectly specialised.
    analysis.add_image(fish, [routed([[0, 0, 50, 50], [1, 1, 50, 50]], [[0, 1], [0, 1]],
                                     [[0.75, 0.25], [0.75, 0.25]], groups=[0], levels=["P2", "P2"])])
    analysis.add_image(penguin, [routed([[0, 0, 50, 50]], [[2, 3]], [[0.5, 0.5]], groups=[1],
                                        levels=["P3"])])
    summary = analysis.summary()
    layer = summary["layers"]["box_head"]
    assert layer["class_expert"]["rows"] == CLASSES + [BACKGROUND]
    assert layer["class_expert"]["mass"][0] == pytest.approx([1.5, 0.5, 0.0, 0.0])
    assert layer["class_expert"]["mass"][2] == pytest.approx([0.0, 0.0, 0.5, 0.5])
    assert layer["expert_load"] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    metrics = layer["metrics"]
    assert metrics["class_expert"]["nmi"] == pytest.approx(1.0)  # class determines the expert pair
    assert metrics["level_expert"]["nmi"] == pytest.approx(1.0)
    assert metrics["expert_class_entropy_bits"] == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert metrics["expert_top_class"] == ["fish", "fish", "penguin", "penguin"]
    assert layer["scene_group_usage"]["fish-like"] == {"images": 1, "group_usage": [1.0, 0.0]}
    assert layer["scene_group_usage"]["bird"] == {"images": 1, "group_usage": [0.0, 1.0]}
    assert layer["scene_group_usage"]["all images"] == {"images": 2, "group_usage": [0.5, 0.5]}
    assert "I(class; expert) = 0.918 bits (normalised 1.000)" in format_metrics(summary)  # H(2/3, 1/3)

    paths = analysis.write(tmp_path, extra={"parameters": {"total": 10}})
    with open(paths["table"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and rows[2]["gt_class"] == "penguin" and rows[2]["expert_0"] == "2"
    assert json.loads(paths["summary"].read_text())["parameters"] == {"total": 10}
    figures = {name for name in paths if name not in ("table", "summary")}
    assert figures == {f"box_head_{k}" for k in ("class_expert", "size_expert", "level_expert", "scene_groups")}
    for name in figures:
        image = matplotlib.image.imread(paths[name])
        assert image.shape[0] >= 250 and image.shape[1] >= 500, name  # 120 dpi, labelled


def test_unknown_layer_is_rejected():
    analysis = RoutingAnalysis(CLASSES, {"box_head": LayerInfo(4, 2)})
    with pytest.raises(KeyError, match="decoder.5"):
        analysis.add_image(ImageTruth(1, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
                           [routed([[0, 0, 1, 1]], [[0, 1]], [[0.5, 0.5]], layer="decoder.5")])


def test_routing_of_predictions_picks_each_images_rows():
    config = MoEConfig(num_experts=4, top_k=2, num_groups=2, scene_top_k=1)
    router = HierarchicalRouter(config, scene_dim=8, instance_dim=8).eval()
    torch.manual_seed(0)
    routing = router(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 0, 0, 1, 1]))
    picked = routing_of_predictions(routing, [3, 2], [torch.tensor([2, 0]), torch.tensor([1])])
    assert torch.equal(picked[0][0], routing.expert_index[[2, 0]])
    assert torch.equal(picked[1][0], routing.expert_index[[4]])
    assert torch.equal(picked[1][1], routing.combine_weight[[4]])
    with pytest.raises(ValueError, match="does not match"):
        routing_of_predictions(routing, [2, 2], [torch.tensor([0]), torch.tensor([0])])


def test_statistics_flush_adds_load_extremes_and_the_console_summary_shows_them():
    config = MoEConfig(num_experts=4, top_k=1, num_groups=0, scene_top_k=4)
    block = MoEBlock(HierarchicalRouter(config, scene_dim=8, instance_dim=8), [8, 8])
    torch.manual_seed(0)
    block(torch.randn(32, 8), torch.randn(2, 8), torch.arange(32) // 16)
    stats = collect_routing_statistics(block)
    loads = [stats[f"himoe/expert_load/{e}"] for e in range(4)]
    assert stats["himoe/load_max"] == max(loads) and stats["himoe/load_min"] == min(loads)
    line = format_routing_summary(stats)
    assert line == (f"himoe: load max {max(loads):.3f} min {min(loads):.3f}  routing_entropy "
                    f"{stats['himoe/routing_entropy']:.3f}  dropped_fraction 0.000")
    scoped = format_routing_summary({"himoe/encoder.0/load_max": 0.5, "himoe/encoder.0/load_min": 0.1,
                                     "himoe/decoder.1/routing_entropy": math.log(2)})
    assert scoped.splitlines() == ["himoe/encoder.0: load max 0.500 min 0.100",
                                   "himoe/decoder.1: routing_entropy 0.693"]
    assert format_routing_summary({"loss_cls": 1.0}) == ""
