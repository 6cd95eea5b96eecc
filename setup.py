#!/usr/bin/env python
"""himoe-plugin: HI-MoE (hierarchical instance-conditioned MoE) for Detectron2 and MMDetection."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "himoe_plugin" / "__init__.py").read_text().split('"""', 2)[2], VERSION)

setup(
    name="himoe-plugin",
    version=VERSION["__version__"],
    description="Hierarchical instance-conditioned mixture-of-experts ROI heads for "
    "Detectron2 and MMDetection 3.x",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["himoe_plugin", "himoe_plugin.*"]),
    install_requires=["torch>=2.0"],
    extras_require={
        # Detectron2 itself is installed from source (docs/INSTALL.md): it is not on PyPI.
        "detectron2": ["fvcore", "pycocotools"],
        "mmdet": ["mmdet>=3.0,<3.4", "mmengine>=0.10", "mmcv>=2.0,<2.2"],
        "test": ["pytest>=7", "pytest-timeout"],
        "benchmarks": ["matplotlib", "tqdm"],
        # tools/analyze_routing.py and himoe_plugin.analysis (figures)
        "analysis": ["matplotlib", "tqdm"],
        # tools/deploy: ONNX export (dynamo exporter: onnxscript), ONNX Runtime and OpenVINO
        "deploy": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3", "openvino>=2024.0"],
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
