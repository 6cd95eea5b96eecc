"""The runtime wrappers: ONNX Runtime and OpenVINO run an exported graph and split its flat
outputs per image as PyTorch does; the comparison helper; the dense twins as controls."""
from pathlib import Path

import numpy as np
import pytest
import torch
from .deploy_helpers import (DINO, FASTER_RCNN, REPO_ROOT, as_detections, assert_same_detections,
                            export_calibrated, valid_images_by_size)

from himoe_plugin.deploy.mmdet_export import (OUTPUTS, TWO_STAGE_INPUTS, eager_detections,
                                              prepare_inputs)
from himoe_plugin.deploy.runtimes import (Detections, OnnxRuntimeDetector, OpenVINODetector,
                                          agreement, load_runtime, split_by_image)


class ThresholdBoxes(torch.nn.Module):
    """A graph with the detectors' contract and data-dependent output sizes: one box per pixel
    of image b's first channel above 0.5 (inside its unpadded area), scaled by ``box_scale``."""

    def forward(self, images, image_sizes, box_scale):
        boxes, scores, labels, image_index = [], [], [], []
        for b in range(images.shape[0]):
            plane = images[b, 0, :image_sizes[b, 0], :image_sizes[b, 1]]
            hits = (plane > 0.5).nonzero()
            xy = hits.flip(1).float()
            boxes.append(torch.cat([xy, xy + 1], dim=1) * box_scale[b].repeat(2))
            scores.append(plane[hits[:, 0], hits[:, 1]])
            labels.append(hits[:, 0] % 3)
            image_index.append(torch.full_like(hits[:, 0], b))
        return tuple(torch.cat(parts) for parts in (boxes, scores, labels, image_index))


@pytest.fixture(scope='module')
def threshold_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp('graph') / 'threshold.onnx'
    sample = (torch.rand(2, 3, 8, 10), torch.tensor([[8, 10], [6, 7]]), torch.rand(2, 2))
    torch.onnx.export(ThresholdBoxes(), sample, str(path), dynamo=False, opset_version=17,
                      input_names=list(TWO_STAGE_INPUTS), output_names=list(OUTPUTS),
                      dynamic_axes={'images': {2: 'height', 3: 'width'},
                                    **{name: {0: f'num_{name}'} for name in OUTPUTS}})
    return path


@pytest.mark.parametrize('runtime', ['onnxruntime', 'openvino'])
def test_runtime_splits_outputs_per_image_like_pytorch(threshold_graph, runtime):
    torch.manual_seed(0)
    detector = load_runtime(runtime, threshold_graph)
    for height, width in ((8, 10), (13, 5)):  # the export size and another one
        inputs = dict(images=torch.rand(2, 3, height, width),
                      image_sizes=torch.tensor([[height, width], [height - 2, width - 1]]),
                      box_scale=torch.rand(2, 2) + 0.5)
        boxes, scores, labels, image_index = (t.numpy() for t in ThresholdBoxes()(**inputs))
        want = split_by_image(boxes, scores, labels, image_index, 2)
        got = detector(inputs)
        assert len(got) == 2
        for g, w in zip(got, want):
            assert len(w.scores) > 0
            np.testing.assert_array_equal(g.labels, w.labels)
            np.testing.assert_allclose(g.boxes, w.boxes, rtol=0, atol=1e-6)
            np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-6)


def test_load_runtime_rejects_unknown_names(threshold_graph):
    with pytest.raises(ValueError, match="runtime='tensorrt'"):
        load_runtime('tensorrt', threshold_graph)


def test_agreement_reports_count_label_and_box_differences():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], dtype=np.float32)
    reference = Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([1, 2]))
    close = Detections(boxes + 5e-4, np.array([0.9, 0.8], np.float32), np.array([1, 2]))
    relabelled = Detections(boxes, np.array([0.9, 0.8], np.float32), np.array([2, 1]))
    fewer = Detections(boxes[:1], np.array([0.9], np.float32), np.array([1]))
    assert agreement(close, reference).within(1e-3, 1e-3)
    assert not agreement(close, reference).within(1e-4, 1e-3)
    assert not agreement(relabelled, reference).within(1e-3, 1e-3)
    check = agreement(fewer, reference)
    assert not check.same_count and not check.within(1e-3, 1e-3)


@pytest.fixture(scope='module')
def two_sizes(data_root: Path):
    groups = list(valid_images_by_size(data_root).values())
    return groups[0][0], groups[1][0]


@pytest.mark.parametrize('runtime_class', [OnnxRuntimeDetector, OpenVINODetector])
def test_dense_faster_rcnn_exact_in_runtime(tmp_path, two_sizes, runtime_class):
    """Control: the dense twin, exported on one image, is exact on another size."""
    detector, pipeline, path = export_calibrated(FASTER_RCNN, [two_sizes[0]], tmp_path / 'frcnn.onnx')
    runtime = runtime_class(path)
    inputs, batch = prepare_inputs(detector, pipeline, [two_sizes[1]])
    assert_same_detections(runtime(inputs)[0], as_detections(eager_detections(detector, batch)[0]))


@pytest.mark.slow
def test_dense_dino_exact_in_onnxruntime(tmp_path, two_sizes):
    """Control: the dense DINO, exported on one image, is exact on another size."""
    detector, pipeline, path = export_calibrated(DINO, [two_sizes[0]], tmp_path / 'dino.onnx')
    runtime = OnnxRuntimeDetector(path)
    inputs, batch = prepare_inputs(detector, pipeline, [two_sizes[1]])
    assert_same_detections(runtime(inputs)[0], as_detections(eager_detections(detector, batch)[0]))


def test_benchmarks_md_deploy_table_is_the_measured_one():
    """docs/BENCHMARKS.md section 8 is benchmarks/deploy.py's table of results/deploy.json."""
    import json
    import sys

    sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))
    from deploy import DOCS_END, DOCS_START, table_lines

    payload = json.loads((REPO_ROOT / 'benchmarks' / 'results' / 'deploy.json').read_text())
    text = (REPO_ROOT / 'docs' / 'BENCHMARKS.md').read_text()
    table = text[text.index(DOCS_START) + len(DOCS_START):text.index(DOCS_END)].strip()
    assert table == '\n'.join(table_lines(payload))
    assert payload['images'] >= 1 and set(payload['results']) == {'faster_rcnn', 'dino'}
