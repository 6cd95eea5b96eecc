"""What the routing analysis and the routing pictures tell a reader: unused experts reported as
unused, the one-line console summary of both frameworks, unambiguous box labels, the expert
legend and the note on an image without predictions."""
import numpy as np
import pytest
import torch

from himoe_plugin.analysis import (ImageTruth, LayerInfo, RoutedInstances, RoutingAnalysis, draw_expert_legend,
                                   expert_colors, format_metrics, no_prediction_note, routed_box_label)
from himoe_plugin.analysis.console import routing_console_line
from himoe_plugin.core import format_routing_summary

CLASSES = ["fish", "shark", "penguin"]


def test_unused_and_background_only_experts_are_reported_as_such():
    """Before: an unused expert printed 'class entropy 0.00 ..., most frequent class None', which
    reads as perfect specialisation."""
    analysis = RoutingAnalysis(CLASSES, {"box_head": LayerInfo(num_experts=4, num_groups=1)})
    fish = ImageTruth(1, torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([0]))
    analysis.add_image(fish, [RoutedInstances(
        "box_head", torch.tensor([[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 50.0, 48.0], [300.0, 300.0, 340.0, 340.0]]),
        torch.tensor([[0, 1], [1, 0], [2, 3]]), torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]]),
        torch.tensor([0]))])
    summary = analysis.summary()
    layer = summary["layers"]["box_head"]
    # Expert 3 only appears with weight 0 (dropped): it got no instance.
    assert layer["expert_instances"] == [2, 2, 1, 0]
    assert layer["metrics"]["expert_class_entropy_bits"] == [0.0, 0.0, None, None]
    lines = format_metrics(summary).splitlines()
    assert lines[-1] == "  expert 3: unused (n=0)"
    assert lines[-2].startswith("  expert 2: load ") and "n=1, background only" in lines[-2]
    assert lines[-4].endswith("n=2, class entropy 0.00 / 1.58 bits, most frequent class fish")
    assert "None" not in format_metrics(summary)


def test_console_line_is_one_line_for_one_layer_or_many():
    one = {"himoe/load_max": 0.5, "himoe/load_min": 0.1, "himoe/routing_entropy": 1.2,
           "himoe/dropped_fraction": 0.0, "himoe/expert_load/0": 0.5, "loss_cls": 1.0}
    assert routing_console_line(one) == format_routing_summary(one) == (
        "himoe: load max 0.500 min 0.100  routing_entropy 1.200  dropped_fraction 0.000")
    stages = {f"himoe/stage{s}/{name}": value + s / 10 for s in range(3)
              for name, value in (("load_max", 0.3), ("load_min", 0.05), ("routing_entropy", 1.0),
                                  ("dropped_fraction", 0.0))}
    assert routing_console_line(stages) == (
        "himoe (3 layers): load max 0.500 (stage2) min 0.050 (stage0)  routing_entropy 1.000 (stage0) .. "
        "1.200 (stage2)  dropped_fraction max 0.200 (stage2)")
    assert routing_console_line({"loss_cls": 1.0}) == ""


def test_box_labels_name_the_expert_and_its_weight_not_a_confidence():
    """Before: 'fish e3 0.51' read as a detection confidence."""
    assert routed_box_label("fish", 3, 0.514) == "fish | expert 3 (w 0.51)"
    assert no_prediction_note(0.3, 0.123) == "no prediction with score >= 0.30 (best score 0.12)"
    assert no_prediction_note(0.3, None) == "no prediction with score >= 0.30 (no predictions)"


@pytest.mark.parametrize("note", [None, "no prediction with score >= 0.30 (best score 0.12)"])
def test_legend_shows_every_expert_colour_and_the_note_a_dark_band(note):
    image = np.full((240, 320, 3), 128, dtype=np.uint8)
    drawn = draw_expert_legend(image, 6, used=[2], note=note)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (image == 128).all()  # the input is left as it was
    size = max(10, 240 // 40)
    for expert, rgb in enumerate(expert_colors(6)):
        top = 4 + expert * (size + 4)
        assert np.abs(drawn[top + size // 2, 4 + size // 2].astype(int) - np.round(255 * np.array(rgb))).max() <= 1
    assert (drawn[120, 160] == 128).all()  # the picture itself is untouched
    band = drawn[-3:]
    assert (band.max() == 0) if note else (band == 128).all()
