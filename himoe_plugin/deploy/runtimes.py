"""Run an exported detector (``.onnx`` from ``himoe_plugin.deploy.mmdet_export``) in ONNX Runtime or
OpenVINO on the CPU and get per-image detections. Needs numpy and the runtime only (no torch).

    detector = OnnxRuntimeDetector('faster_rcnn.onnx')      # or OpenVINODetector(...)
    per_image = detector(inputs)   # inputs: the graph inputs by name (numpy or torch tensors)
    per_image[0].boxes, per_image[0].scores, per_image[0].labels
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Union

import numpy as np

#: Runtime names (``--runtime`` choices of the tools).
RUNTIMES = ('onnxruntime', 'openvino')


@dataclass
class Detections:
    """One image's detections in original image coordinates.

    Attributes:
        boxes: (n, 4) float32 x1, y1, x2, y2.
        scores: (n,) float32.
        labels: (n,) int64 class indices.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def split_by_image(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                   image_index: np.ndarray, num_images: int) -> List[Detections]:
    """The graph's flat outputs (image by image, ``image_index`` of each row) per image."""
    return [Detections(boxes[image_index == i], scores[image_index == i],
                       labels[image_index == i].astype(np.int64)) for i in range(num_images)]


def as_numpy(inputs: Mapping[str, object]) -> Dict[str, np.ndarray]:
    """Graph inputs as numpy arrays (torch tensors are converted)."""
    return {name: value.numpy() if hasattr(value, 'numpy') else np.asarray(value)
            for name, value in inputs.items()}


class OnnxRuntimeDetector:
    """An exported detector in an ONNX Runtime session (CPU execution provider).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (0: ONNX Runtime's default).
        providers: execution providers (default: CPU only).
    """

    name = 'onnxruntime'

    def __init__(self, path: Union[str, Path], threads: int = 0,
                 providers: Sequence[str] = ('CPUExecutionProvider',)) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: Mapping[str, object]) -> List[np.ndarray]:
        """The raw outputs (boxes, scores, labels, image_index) of one batch."""
        arrays = as_numpy(inputs)
        return self.session.run(None, {name: arrays[name] for name in self.input_names})

    def __call__(self, inputs: Mapping[str, object]) -> List[Detections]:
        """Per-image detections of one batch (the batch size the graph was exported with)."""
        boxes, scores, labels, image_index = self.run(inputs)
        return split_by_image(boxes, scores, labels, image_index, len(inputs['images']))


class OpenVINODetector:
    """An exported detector compiled by OpenVINO for the CPU, in float32 (no bf16/f16
    inference precision, so results match PyTorch).

    Args:
        path: the ``.onnx`` file (read directly by OpenVINO's ONNX frontend).
        threads: inference threads (0: OpenVINO's default).
    """

    name = 'openvino'

    def __init__(self, path: Union[str, Path], threads: int = 0) -> None:
        import openvino as ov

        core = ov.Core()
        config = {'INFERENCE_PRECISION_HINT': 'f32'}
        if threads:
            config['INFERENCE_NUM_THREADS'] = threads
        model = core.read_model(str(path))
        self.compiled = core.compile_model(model, 'CPU', config)
        self.request = self.compiled.create_infer_request()
        # An input tensor can carry several names (the graph input's and an internal one).
        self.input_names = [set(port.get_names()) for port in self.compiled.inputs]

    def run(self, inputs: Mapping[str, object]) -> List[np.ndarray]:
        """The raw outputs (boxes, scores, labels, image_index) of one batch."""
        arrays = as_numpy(inputs)
        feed = {}
        for index, names in enumerate(self.input_names):
            found = names & set(arrays)
            if not found:
                raise KeyError(f'the graph input {sorted(names)} is not among the inputs given '
                               f'({sorted(arrays)})')
            feed[index] = arrays[found.pop()]
        results = self.request.infer(feed)
        return [np.array(results[output]) for output in self.compiled.outputs]

    def __call__(self, inputs: Mapping[str, object]) -> List[Detections]:
        """Per-image detections of one batch (the batch size the graph was exported with)."""
        boxes, scores, labels, image_index = self.run(inputs)
        return split_by_image(boxes, scores, labels, image_index, len(inputs['images']))


def load_runtime(name: str, path: Union[str, Path], threads: int = 0):
    """``OnnxRuntimeDetector`` or ``OpenVINODetector`` by runtime name (``RUNTIMES``)."""
    if name == 'onnxruntime':
        return OnnxRuntimeDetector(path, threads)
    if name == 'openvino':
        return OpenVINODetector(path, threads)
    raise ValueError(f'runtime={name!r}: must be one of {RUNTIMES}')


@dataclass
class Agreement:
    """How far one image's runtime detections are from the reference (PyTorch) detections.

    Attributes:
        same_count: both have the same number of detections.
        same_labels: identical labels, in order.
        max_box_diff: largest absolute box-coordinate difference in pixels (inf if counts differ).
        max_score_diff: largest absolute score difference (inf if counts differ).
    """

    same_count: bool
    same_labels: bool
    max_box_diff: float
    max_score_diff: float

    def within(self, box_atol: float, score_atol: float) -> bool:
        return self.same_labels and self.max_box_diff <= box_atol \
            and self.max_score_diff <= score_atol


def agreement(runtime: Detections, reference: Detections) -> Agreement:
    """Compare detections row by row (both are ordered by score, image by image)."""
    if len(runtime.scores) != len(reference.scores):
        return Agreement(False, False, float('inf'), float('inf'))
    if len(runtime.scores) == 0:
        return Agreement(True, True, 0.0, 0.0)
    return Agreement(
        True, bool(np.array_equal(runtime.labels, reference.labels)),
        float(np.abs(runtime.boxes - reference.boxes).max()),
        float(np.abs(runtime.scores - reference.scores).max()))
