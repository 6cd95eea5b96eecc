"""ONNX export of MMDetection HI-MoE detectors: exported on one image, exact on images of other
sizes whose routing differs, in ONNX Runtime and OpenVINO; the errors of what does not export."""
from pathlib import Path

import numpy as np
import pytest
import torch
from .deploy_helpers import (CONFIG_DIR, HIMOE_DINO, HIMOE_FASTER_RCNN, as_detections,
                            assert_same_detections, export_calibrated, valid_images_by_size)

from himoe_plugin.core import MoEConfigError
from himoe_plugin.deploy.mmdet_export import (MMDetONNXModel, eager_detections, export_onnx,
                                              load_detector, prepare_inputs, inference_pipeline)
from himoe_plugin.deploy.runtimes import OnnxRuntimeDetector, OpenVINODetector


def rows_per_expert(detector, batch) -> np.ndarray:
    """(E,) how many RoIs / tokens of one eager inference each expert of the first MoE block
    computed (summed over its k choices)."""
    from himoe_plugin.core import MoEBlock

    block = next(m for m in detector.modules() if isinstance(m, MoEBlock))
    seen = []
    handle = block.register_forward_hook(lambda module, args, out: seen.append(out[1]))
    try:
        eager_detections(detector, batch)
    finally:
        handle.remove()
    experts = seen[0].expert_index.reshape(-1)
    return np.bincount(experts.numpy(), minlength=block.config.num_experts)


@pytest.fixture(scope='module')
def sized_images(data_root: Path):
    """Image A (the export sample) and B..D: one Aquarium valid image of each other size."""
    groups = valid_images_by_size(data_root)
    assert len(groups) >= 4, f'need 4 image sizes, found {list(groups)}'
    firsts = [paths[0] for paths in groups.values()]
    return firsts[0], firsts[1:4]


@pytest.fixture(scope='module')
def himoe_faster_rcnn_export(tmp_path_factory, sized_images):
    """HI-MoE Faster R-CNN (random init, distinct experts) exported on image A."""
    return export_calibrated(HIMOE_FASTER_RCNN, [sized_images[0]],
                             tmp_path_factory.mktemp('onnx') / 'himoe_frcnn.onnx')


def check_other_sizes(runtime_class, export, sized_images) -> None:
    detector, pipeline, path = export
    runtime = runtime_class(path)
    image_a, others = sized_images
    _, batch_a = prepare_inputs(detector, pipeline, [image_a])
    routing_a = rows_per_expert(detector, batch_a)
    for image in others:
        inputs, batch = prepare_inputs(detector, pipeline, [image])
        assert inputs['images'].shape[-2:] != prepare_inputs(
            detector, pipeline, [image_a])[0]['images'].shape[-2:]
        assert not np.array_equal(rows_per_expert(detector, batch), routing_a), \
            f'{image.name} routes like the export sample: it tests nothing'
        want = as_detections(eager_detections(detector, batch)[0])
        got = runtime(inputs)[0]
        assert_same_detections(got, want)


def test_himoe_faster_rcnn_onnxruntime_exact_on_other_sizes(himoe_faster_rcnn_export,
                                                            sized_images):
    check_other_sizes(OnnxRuntimeDetector, himoe_faster_rcnn_export, sized_images)


def test_himoe_faster_rcnn_openvino_exact_on_other_sizes(himoe_faster_rcnn_export,
                                                         sized_images):
    check_other_sizes(OpenVINODetector, himoe_faster_rcnn_export, sized_images)


@pytest.mark.slow
def test_himoe_faster_rcnn_batch_matches_single_images(tmp_path, himoe_faster_rcnn_export,
                                                       data_root):
    """Two images exported as one batch give each image's own (single-image) detections."""
    detector, pipeline, _ = himoe_faster_rcnn_export
    first_size = next(iter(valid_images_by_size(data_root).values()))
    sample_pair, test_pair = first_size[:2], first_size[2:4]
    sample, _ = prepare_inputs(detector, pipeline, sample_pair)
    runtime = OnnxRuntimeDetector(export_onnx(detector, sample, tmp_path / 'batch2.onnx'))
    inputs, _ = prepare_inputs(detector, pipeline, test_pair)
    for got, image in zip(runtime(inputs), test_pair):
        _, single = prepare_inputs(detector, pipeline, [image])
        assert_same_detections(got, as_detections(eager_detections(detector, single)[0]))


@pytest.mark.slow
def test_himoe_dino_onnxruntime_exact(tmp_path, data_root):
    """HI-MoE DINO (MoE FFNs in the decoder) exported on one image is exact in ONNX Runtime on
    images of every size. Decoder layers only: with the thousands of encoder tokens of a random
    model, a router's top-k near-tie (within float rounding) flips between runtimes on some
    images (benchmarks/deploy.py counts them for the full model)."""
    groups = valid_images_by_size(data_root)
    sample_image, *same_size = next(iter(groups.values()))[:3]
    detector, pipeline, path = export_calibrated(HIMOE_DINO, [sample_image],
                                                 tmp_path / 'himoe_dino.onnx',
                                                 {'model.moe.encoder_layers': []})
    runtime = OnnxRuntimeDetector(path)
    others = same_size + [paths[0] for paths in list(groups.values())[1:]]
    for image in others:
        inputs, batch = prepare_inputs(detector, pipeline, [image])
        want = as_detections(eager_detections(detector, batch)[0])
        assert_same_detections(runtime(inputs)[0], want)


def test_cascade_head_is_refused_naming_the_key():
    detector, _ = load_detector(CONFIG_DIR / 'himoe-cascade-rcnn_r18_fpn_aquarium_cpu.py')
    with pytest.raises(MoEConfigError, match='model.roi_head.type'):
        MMDetONNXModel(detector)


def test_export_inputs_follow_the_mmdet_pipeline(sized_images):
    """The graph inputs carry the preprocessed batch, each image's unpadded size and the
    rescaling factors, as the detector's own ``test_step`` sees them."""
    detector, cfg = load_detector(HIMOE_FASTER_RCNN)
    inputs, batch = prepare_inputs(detector, inference_pipeline(cfg), [sized_images[0]])
    processed = detector.data_preprocessor(batch, False)
    torch.testing.assert_close(inputs['images'], processed['inputs'])
    meta = processed['data_samples'][0].metainfo
    assert inputs['image_sizes'].tolist() == [list(meta['img_shape'][:2])]
    assert inputs['images'].shape[-1] % 32 == 0 and inputs['images'].shape[-2] % 32 == 0
    assert tuple(inputs['images'].shape[-2:]) != tuple(meta['img_shape'][:2])  # padded
    torch.testing.assert_close(inputs['box_scale'] * inputs['scale_factors'],
                               torch.ones(1, 2))
