"""Export an MMDetection Faster R-CNN or DINO (dense or HI-MoE) to ONNX and check it in the runtimes.

    python tools/deploy/mmdet_export.py configs/mmdet/aquarium/himoe-faster-rcnn_r18_fpn_aquarium_cpu.py \\
        --checkpoint work_dirs/himoe/iter_2000.pth --sample-image IMG --output himoe_frcnn.onnx \\
        --verify IMG2 IMG3 --runtime onnxruntime openvino

The graph takes the preprocessed batch (the config's test pipeline and the model's data
preprocessor, see ``himoe_plugin.deploy.mmdet_export.prepare_inputs``) and returns boxes, scores,
labels and image index in original image coordinates; height and width are dynamic, the batch
size is that of the sample (``--sample-image`` given several times). ``--verify`` runs every
given image (one batch of the export's size at a time) through the PyTorch model and each
runtime and fails unless the labels are identical and boxes and scores agree to ``--atol``.
See docs/deploy.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from himoe_plugin.deploy.runtimes import RUNTIMES, agreement, load_runtime  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='MMDetection config (HI-MoE or dense)')
    parser.add_argument('--checkpoint', help='weights to export (default: random init, seeded)')
    parser.add_argument('--sample-image', action='append', required=True,
                        help='image traced for the export; repeat it for a batch of several')
    parser.add_argument('--output', required=True, help='the .onnx file to write')
    parser.add_argument('--static-size', action='store_true',
                        help='fix height and width to the sample\'s (default: dynamic)')
    parser.add_argument('--verify', nargs='*', default=[],
                        help='images to compare runtime and PyTorch detections on')
    parser.add_argument('--runtime', nargs='+', choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument('--atol', type=float, default=1e-3,
                        help='largest box (px) and score difference --verify accepts')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides, e.g. model.roi_head.bbox_head.router.top_k=1')
    return parser.parse_args(argv)


def parse_options(pairs):
    from mmengine.config import DictAction

    namespace = argparse.Namespace()
    DictAction(option_strings=[], dest='options')(None, namespace, pairs)
    return namespace.options


def main(argv=None) -> int:
    args = parse_args(argv)
    from himoe_plugin.deploy.mmdet_export import (eager_detections, export_onnx, load_detector,
                                                  prepare_inputs, inference_pipeline)
    from himoe_plugin.deploy.runtimes import Detections

    options = parse_options(args.cfg_options) if args.cfg_options else None
    detector, cfg = load_detector(args.config, args.checkpoint, options)
    pipeline = inference_pipeline(cfg)
    sample, _ = prepare_inputs(detector, pipeline, args.sample_image)
    path = export_onnx(detector, sample, args.output, dynamic_size=not args.static_size)
    print(f'wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)')
    if not args.verify:
        return 0
    batch_size = len(args.sample_image)
    if len(args.verify) % batch_size:
        raise SystemExit(f'--verify: {len(args.verify)} images do not fill batches of '
                         f'{batch_size} (the export batch size)')
    runtimes = [load_runtime(name, path) for name in args.runtime]
    failed = 0
    for start in range(0, len(args.verify), batch_size):
        images = args.verify[start:start + batch_size]
        inputs, batch = prepare_inputs(detector, pipeline, images)
        reference = [Detections(*(d[k].numpy() for k in ('boxes', 'scores', 'labels')))
                     for d in eager_detections(detector, batch)]
        for runtime in runtimes:
            for image, got, want in zip(images, runtime(inputs), reference):
                check = agreement(got, want)
                ok = check.within(args.atol, args.atol)
                failed += not ok
                print(f'{runtime.name:12s} {Path(image).name}: {len(want.scores)} detections, '
                      f'labels {"identical" if check.same_labels else "DIFFER"}, '
                      f'max box diff {check.max_box_diff:.2e} px, '
                      f'max score diff {check.max_score_diff:.2e} {"ok" if ok else "FAILED"}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
