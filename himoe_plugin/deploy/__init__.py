"""Deployment of HI-MoE detectors: ONNX export of MMDetection models and the runtimes that run it.

- ``himoe_plugin.deploy.mmdet_export``: ``MMDetONNXModel`` (the tensor forward of a Faster
  R-CNN or DINO detector, dense or HI-MoE: preprocessed batch -> boxes, scores, labels) and
  ``export_onnx``; needs MMDetection.
- ``himoe_plugin.deploy.runtimes``: run an exported ``.onnx`` in ONNX Runtime or OpenVINO (CPU)
  and get per-image detections; needs only numpy and the runtime.

See docs/deploy.md.
"""
