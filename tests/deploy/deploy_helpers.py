"""Images and models shared by the deployment tests."""
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / 'configs' / 'mmdet' / 'aquarium'
HIMOE_FASTER_RCNN = CONFIG_DIR / 'himoe-faster-rcnn_r18_fpn_aquarium_cpu.py'
FASTER_RCNN = CONFIG_DIR / 'faster-rcnn_r18_fpn_aquarium_cpu.py'
HIMOE_DINO = CONFIG_DIR / 'himoe-dino-4scale_r18_aquarium_cpu.py'
DINO = CONFIG_DIR / 'dino-4scale_r18_aquarium_cpu.py'
#: An exported model's scores agree with PyTorch's to this; its boxes to BOX_ATOL pixels
#: (float32 spacing at 1024 px is 1.2e-4: boxes in original coordinates cannot agree to 1e-4).
SCORE_ATOL = 1e-4
BOX_ATOL = 1e-3


def valid_images_by_size(data_root: Path) -> Dict[tuple, List[Path]]:
    """Aquarium valid images grouped by (height, width), sizes in order of first appearance."""
    groups: Dict[tuple, List[Path]] = OrderedDict()
    for path in sorted((data_root / 'aquarium' / 'images' / 'valid').glob('*.jpg')):
        width, height = Image.open(path).size
        groups.setdefault((height, width), []).append(path)
    return groups


def as_detections(eager: dict):
    from himoe_plugin.deploy.runtimes import Detections

    return Detections(*(eager[key].numpy() for key in ('boxes', 'scores', 'labels')))


def assert_same_detections(got, want) -> None:
    """Same count, identical labels, boxes within ``BOX_ATOL`` px, scores within ``SCORE_ATOL``."""
    assert len(got.scores) == len(want.scores), (len(got.scores), len(want.scores))
    assert len(want.scores) > 0, 'no detections to compare'
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=0, atol=BOX_ATOL)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=SCORE_ATOL)


@torch.no_grad()
def calibrate_batch_norm(detector, images) -> None:
    """BN running statistics from ``images`` (B, 3, H, W): random init without it makes the
    eval-mode activations explode through the backbone (degenerate proposals and scores)."""
    norms = [m for m in detector.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    detector.train()
    for _ in range(2):
        detector.extract_feat(images)
    detector.eval()


def export_calibrated(config: Path, sample_images: List[Path], path: Path, options=None):
    """``random_detector(config, sample_images, options)`` exported on ``sample_images`` (one
    batch) to ``path``; returns (detector, test pipeline, path)."""
    from himoe_plugin.deploy.mmdet_export import export_onnx

    detector, pipeline, sample = random_detector(config, sample_images, options)
    return detector, pipeline, export_onnx(detector, sample, path)


#: Config overrides of the random-init test models: no batch padding (see ``random_detector``).
UNPADDED = {'model.data_preprocessor.pad_size_divisor': 1}


def random_detector(config: Path, sample_images: List[Path], options=None):
    """The detector of ``config`` at random init (seeded), BN statistics from the sample, whose
    single images are not padded to a multiple of 32. A random RPN can rank the anchors of the
    constant padded border among its top ``nms_pre``; they tie exactly, and PyTorch's sort and
    ONNX TopK order exact ties differently (a trained RPN scores padding low). Returns
    (detector, pipeline, sample inputs)."""
    from himoe_plugin.deploy.mmdet_export import (inference_pipeline, load_detector,
                                                  prepare_inputs)

    detector, cfg = load_detector(config, cfg_options={**UNPADDED, **(options or {})})
    pipeline = inference_pipeline(cfg)
    sample, _ = prepare_inputs(detector, pipeline, sample_images)
    calibrate_batch_norm(detector, sample['images'])
    return detector, pipeline, sample
