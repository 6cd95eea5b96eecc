"""Exported HI-MoE vs exported dense detectors in ONNX Runtime and OpenVINO (CPU), side by side.

    python benchmarks/deploy.py                      # 20 exactness images, 7 repeats, batch 4
    python benchmarks/deploy.py --quick              # 4 images, 3 repeats, no batch export
    python benchmarks/deploy.py --timer cpu --threads 1   # CPU time, on a machine shared with other jobs

MMDetection models of configs/mmdet/aquarium (R18, short side 256), exported with
``himoe_plugin.deploy.mmdet_export`` on one Aquarium valid image (A) and run on others:

  Faster R-CNN   dense; HI-MoE k=1 and k=2 (E=6 in 3 groups, scene keeps 2: the config);
                 HI-MoE k=1 with E=4 and E=16 (2 groups, scene keeps 1: only E differs)
  DINO           dense; HI-MoE split_e8k2 (every FFN split-upcycled into E=8 experts of
                 1024 / 8 channels, k=2, no shared expert)

Every HI-MoE model is its dense twin's state dict upcycled (copy with noise 0.01 / split), so
everything outside the experts is identical (BN statistics calibrated on the images first: random
init without it makes activations explode).

Measured, in one process:
- exactness: every exported model in each runtime vs PyTorch on ``--images`` valid images other
  than A (four different input sizes): largest box difference (px), largest score difference,
  images with identical labels;
- latency at batch 1, each runtime: all models of a family alternating within every repeat
  (``benchmarks/timing.py``), median seconds and per-repeat ratios to the dense export;
- images/s at batch ``--batch`` (an export with that batch size) for dense and HI-MoE k=1;
- exported file size against total parameters.
Results: benchmarks/results/deploy.json (and .md); docs/BENCHMARKS.md's deploy table is
written from the JSON by ``--write-docs``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

import torch

from detector import data_root
from timing import (RESULTS_DIR, add_timer_arguments, apply_timer_arguments, compare, fmt_ratio,
                    ratio_summary, write_results)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / 'tests' / 'deploy'))
from deploy_helpers import random_detector  # noqa: E402  (the tests' model setup)
CONFIGS = REPO_ROOT / 'configs' / 'mmdet' / 'aquarium'
BOX_HEAD = 'model.roi_head.bbox_head'
HIMOE_HEAD = {f'{BOX_HEAD}.upcycle_noise_std': 0.01}

#: family -> model name -> (config, config overrides). The first model of a family is dense.
MODELS = {
    'faster_rcnn': {
        'dense': ('faster-rcnn_r18_fpn_aquarium_cpu.py', {}),
        'himoe_k1': ('himoe-faster-rcnn_r18_fpn_aquarium_cpu.py',
                     {**HIMOE_HEAD, f'{BOX_HEAD}.router.top_k': 1}),
        'himoe_k2': ('himoe-faster-rcnn_r18_fpn_aquarium_cpu.py', HIMOE_HEAD),
        'himoe_e4_k1': ('himoe-faster-rcnn_r18_fpn_aquarium_cpu.py', {
            **HIMOE_HEAD, f'{BOX_HEAD}.router': dict(
                type='HierarchicalRouter', num_experts=4, num_groups=2, scene_top_k=1, top_k=1)}),
        'himoe_e16_k1': ('himoe-faster-rcnn_r18_fpn_aquarium_cpu.py', {
            **HIMOE_HEAD, f'{BOX_HEAD}.router': dict(
                type='HierarchicalRouter', num_experts=16, num_groups=2, scene_top_k=1, top_k=1)}),
    },
    'dino': {
        'dense': ('dino-4scale_r18_aquarium_cpu.py', {}),
        'split_e8k2': ('himoe-dino-4scale_r18_aquarium_cpu.py', {
            'model.moe.router': dict(type='HierarchicalRouter', num_experts=8, num_groups=4,
                                     scene_top_k=2, top_k=2),
            'model.moe.shared_expert': False, 'model.moe.upcycle': dict(mode='split')}),
    },
}
#: Batch export (images/s) for these models.
BATCH_MODELS = {'faster_rcnn': ('dense', 'himoe_k1'), 'dino': ('dense', 'split_e8k2')}
TARGETS = {('faster_rcnn', 'himoe_k1'): '<= 1.10', ('dino', 'split_e8k2'): '< 1.00',
           ('faster_rcnn', 'himoe_e16_k1'): '<= 1.15 x E=4'}


class Exported:
    """One model: the PyTorch detector, its exports and their runtimes."""

    def __init__(self, detector, pipeline, path: Path, threads: int):
        from himoe_plugin.deploy.runtimes import OnnxRuntimeDetector, OpenVINODetector

        self.detector, self.pipeline, self.path = detector, pipeline, path
        self.runtimes = {'onnxruntime': OnnxRuntimeDetector(path, threads),
                         'openvino': OpenVINODetector(path, threads)}


def build_family(family: str, sample_images: List[Path], tmp: Path, threads: int
                 ) -> Dict[str, Exported]:
    """Every model of ``MODELS[family]``, the HI-MoE ones upcycled from the dense one, exported
    on ``sample_images`` (one batch)."""
    from himoe_plugin.deploy.mmdet_export import export_onnx

    out: Dict[str, Exported] = {}
    dense_state = None
    for name, (config, options) in MODELS[family].items():
        detector, pipeline, sample = random_detector(CONFIGS / config, sample_images, options)
        if dense_state is None:
            dense_state = copy.deepcopy(detector.state_dict())
        else:
            detector.load_state_dict(dense_state, strict=False)
        detector.eval()
        path = export_onnx(detector, sample, tmp / f'{family}_{name}_b{len(sample_images)}.onnx')
        out[name] = Exported(detector, pipeline, path, threads)
    return out


def exactness(models: Dict[str, Exported], images: List[Path]) -> Dict[str, dict]:
    """Per model and runtime: largest box / score difference to PyTorch, identical-label images."""
    from himoe_plugin.deploy.mmdet_export import eager_detections, prepare_inputs
    from himoe_plugin.deploy.runtimes import Detections, agreement

    report: Dict[str, dict] = {}
    for name, model in models.items():
        pipeline = model.pipeline
        checks: Dict[str, list] = {runtime: [] for runtime in model.runtimes}
        for image in images:
            inputs, batch = prepare_inputs(model.detector, pipeline, [image])
            want = Detections(*(v.numpy() for v in eager_detections(model.detector, batch)[0].values()))
            for runtime_name, runtime in model.runtimes.items():
                checks[runtime_name].append(agreement(runtime(inputs)[0], want))
        report[name] = {runtime: dict(
            images=len(found),
            identical_labels=sum(c.same_labels for c in found),
            max_box_diff_px=max(c.max_box_diff for c in found),
            max_score_diff=max(c.max_score_diff for c in found)) for runtime, found in checks.items()}
    return report


def latency(models: Dict[str, Exported], inputs: dict, repeats: int, timer: str
            ) -> Dict[str, dict]:
    """Per runtime: seconds of every model on ``inputs``, alternating, and ratios to dense."""
    out = {}
    for runtime in ('onnxruntime', 'openvino'):
        contenders: Dict[str, Callable[[], object]] = {
            name: (lambda r=model.runtimes[runtime]: r.run(inputs)) for name, model in models.items()}
        seconds = compare(contenders, repeats=repeats, warmup=2, timer=timer)
        summary = ratio_summary(seconds, 'dense')
        if 'himoe_e4_k1' in seconds:
            summary['himoe_e16_k1_vs_e4'] = ratio_summary(
                {k: seconds[k] for k in ('himoe_e4_k1', 'himoe_e16_k1')}, 'himoe_e4_k1')['himoe_e16_k1']
        out[runtime] = dict(summary=summary, seconds=seconds)
    return out


def sizes(models: Dict[str, Exported]) -> Dict[str, dict]:
    """Exported file size against the PyTorch model's parameters."""
    out = {}
    for name, model in models.items():
        params = sum(p.numel() for p in model.detector.parameters())
        out[name] = dict(params=params, param_mib=params * 4 / 2**20,
                         file_mib=model.path.stat().st_size / 2**20)
    return out


def images_by_size(root: Path) -> List[List[Path]]:
    """Aquarium valid images grouped by (height, width), sizes in order of first appearance."""
    from PIL import Image

    groups: Dict[tuple, List[Path]] = {}
    for path in sorted((root / 'aquarium' / 'images' / 'valid').glob('*.jpg')):
        groups.setdefault(Image.open(path).size, []).append(path)
    return list(groups.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=20, help='held-out images for exactness')
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--batch', type=int, default=4, help='batch of the throughput export (0: none)')
    parser.add_argument('--families', nargs='+', default=list(MODELS), choices=list(MODELS))
    parser.add_argument('--quick', action='store_true', help='4 images, 3 repeats, no batch export')
    parser.add_argument('--write-docs', action='store_true',
                        help='only rewrite the deploy table of docs/BENCHMARKS.md from the JSON')
    add_timer_arguments(parser)
    args = parser.parse_args()
    if args.write_docs:
        write_docs()
        return
    args.device = torch.device('cpu')
    apply_timer_arguments(args)
    if args.quick:
        args.images, args.repeats, args.batch = 4, 3, 0
    threads = args.threads or torch.get_num_threads()

    from himoe_plugin.deploy.mmdet_export import prepare_inputs
    groups = images_by_size(data_root())
    sample = groups[0][0]
    # Held-out images: round-robin over the sizes, so every size is covered.
    pool = [paths[i] for i in range(1, max(len(p) for p in groups)) for paths in groups if i < len(paths)]
    held_out = pool[:args.images]
    tmp = Path(tempfile.mkdtemp())
    results: Dict[str, dict] = {}
    for family in args.families:
        models = build_family(family, [sample], tmp, threads)
        first = next(iter(models.values()))
        inputs, _ = prepare_inputs(first.detector, first.pipeline, [sample])
        family_result = dict(exactness=exactness(models, held_out),
                             latency=latency(models, inputs, args.repeats, args.timer),
                             size=sizes(models))
        if args.batch > 1:
            same_size = groups[0][1:1 + args.batch]
            batch_models = {name: models[name] for name in BATCH_MODELS[family]}
            exported = build_family_subset(family, batch_models, same_size, tmp, threads)
            batch_inputs, _ = prepare_inputs(first.detector, first.pipeline, same_size)
            measured = latency_pair(exported, batch_inputs, args.repeats, args.timer)
            family_result['throughput'] = dict(batch=args.batch, **{
                runtime: {name: args.batch / s['median_s'] for name, s in summary.items()}
                for runtime, summary in measured.items()})
        results[family] = family_result
        del models
    payload = dict(images=len(held_out), repeats=args.repeats, timer=args.timer, threads=threads,
                   batch=args.batch, versions=runtime_versions(), results=results)
    path = write_results('deploy', payload, table_lines(payload))
    print('\n'.join(table_lines(payload)))
    print(f'\nwrote {path}')


def build_family_subset(family: str, models: Dict[str, Exported], images: List[Path], tmp: Path,
                        threads: int) -> Dict[str, Exported]:
    """``models`` (already built) exported again with a batch of ``images``."""
    from himoe_plugin.deploy.mmdet_export import export_onnx, prepare_inputs

    out = {}
    for name, model in models.items():
        sample, _ = prepare_inputs(model.detector, model.pipeline, images)
        path = export_onnx(model.detector, sample, tmp / f'{family}_{name}_b{len(images)}.onnx')
        out[name] = Exported(model.detector, model.pipeline, path, threads)
    return out


def latency_pair(models: Dict[str, Exported], inputs: dict, repeats: int, timer: str
                 ) -> Dict[str, Dict[str, dict]]:
    out = {}
    for runtime in ('onnxruntime', 'openvino'):
        contenders = {name: (lambda r=model.runtimes[runtime]: r.run(inputs))
                      for name, model in models.items()}
        out[runtime] = ratio_summary(compare(contenders, repeats=repeats, warmup=1, timer=timer),
                                     'dense')
    return out


def runtime_versions() -> Dict[str, str]:
    import mmcv
    import mmdet
    import onnx
    import onnxruntime
    import openvino

    # The PyTorch reference's NMS and RoIAlign run mmcv's compiled ops (mmcv._ext).
    compiled = getattr(sys.modules.get('mmcv._ext'), '__file__', None) is not None
    return dict(torch=torch.__version__, mmcv=mmcv.__version__, mmdet=mmdet.__version__,
                mmcv_ops='compiled' if compiled else 'stand-in', onnx=onnx.__version__,
                onnxruntime=onnxruntime.__version__, openvino=openvino.__version__)


def table_lines(payload: dict) -> List[str]:
    """The deploy table (docs/BENCHMARKS.md and results/deploy.md) from the JSON payload."""
    versions = payload['versions']
    lines = [
        f"MMDetection R18 aquarium CPU configs, exported on one image; ONNX Runtime "
        f"{versions['onnxruntime']} and OpenVINO {versions['openvino']} on the CPU, "
        f"{payload['threads']} thread(s), {payload['timer']} time; latency: median of "
        f"{payload['repeats']} repeats at batch 1, all models of a family alternating, ratio = "
        f"per-repeat time / exported dense (median, min-max); exactness on {payload['images']} "
        "held-out Aquarium valid images of four sizes.", "",
        "| family | model | runtime | batch-1 s | / dense | target | max box diff (px) | "
        "max score diff | identical labels | file MiB | params (M) |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for family, result in payload['results'].items():
        for name, size in result['size'].items():
            for runtime in ('onnxruntime', 'openvino'):
                summary = result['latency'][runtime]['summary'][name]
                exact = result['exactness'][name][runtime]
                target = TARGETS.get((family, name), '')
                if name == 'himoe_e16_k1':
                    vs_e4 = result['latency'][runtime]['summary']['himoe_e16_k1_vs_e4']
                    target = f"{target}: {fmt_ratio(vs_e4)}"
                lines.append(
                    f"| {family} | {name} | {runtime} | {summary['median_s']:.3f} | "
                    f"{fmt_ratio(summary)} | {target} | {exact['max_box_diff_px']:.1e} | "
                    f"{exact['max_score_diff']:.1e} | {exact['identical_labels']}/{exact['images']} | "
                    f"{size['file_mib']:.1f} | {size['params'] / 1e6:.2f} |")
    throughput = [(f, r['throughput']) for f, r in payload['results'].items() if 'throughput' in r]
    if throughput:
        lines += ["", "| family | model | runtime | images/s at batch "
                  f"{throughput[0][1]['batch']} |", "|---|---|---|---:|"]
        for family, measured in throughput:
            for runtime in ('onnxruntime', 'openvino'):
                for name, rate in measured[runtime].items():
                    lines.append(f"| {family} | {name} | {runtime} | {rate:.2f} |")
    return lines


DOCS_START = '<!-- deploy table: written by benchmarks/deploy.py --write-docs -->'
DOCS_END = '<!-- end of deploy table -->'


def write_docs() -> None:
    """Replace the deploy table of docs/BENCHMARKS.md with the one of results/deploy.json."""
    import json

    payload = json.loads((RESULTS_DIR / 'deploy.json').read_text())
    docs = REPO_ROOT / 'docs' / 'BENCHMARKS.md'
    text = docs.read_text()
    start, end = text.index(DOCS_START) + len(DOCS_START), text.index(DOCS_END)
    docs.write_text(text[:start] + '\n' + '\n'.join(table_lines(payload)) + '\n' + text[end:])
    print(f'rewrote the deploy table of {docs}')


if __name__ == '__main__':
    main()
