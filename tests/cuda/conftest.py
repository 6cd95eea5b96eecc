"""Fixtures of the CUDA checks (marker ``cuda``: ``pytest tests`` deselects them).

``tools/gpu/run_checks.sh`` runs them on a GPU (``pytest tests/cuda -m cuda``). They run on
``$HIMOE_CUDA_TESTS_DEVICE`` (default ``cuda``); the CPU dry run of that script
(``tests/test_gpu_kit.py``) sets it to ``cpu``, where each test runs its CPU counterpart (gloo
for NCCL, torch's grouped GEMM fallback, CPU bfloat16 autocast for the experts; the Detectron2
step in float32 and smaller, as CPU autocast convolutions take minutes).
"""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def device() -> torch.device:
    device = torch.device(os.environ.get("HIMOE_CUDA_TESTS_DEVICE", "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the cuda tests need a CUDA device (HIMOE_CUDA_TESTS_DEVICE=cpu runs their "
                           "CPU counterparts, as the dry run of tools/gpu/run_checks.sh does)")
    return device


@pytest.fixture(scope="session")
def aquarium_root() -> Path:
    """``$HIMOE_DATA_ROOT/aquarium`` or ``../shared/data/aquarium``; fails loudly if absent."""
    root = Path(os.environ.get("HIMOE_DATA_ROOT", REPO_ROOT.parent / "shared" / "data")) / "aquarium"
    for required in ("annotations/instances_train.json", "images/train"):
        if not (root / required).exists():
            raise RuntimeError(f"Aquarium data missing: {root / required} (set HIMOE_DATA_ROOT)")
    return root


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Shapes of the first operands of the calls that reach ``torch._grouped_mm``."""
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls
