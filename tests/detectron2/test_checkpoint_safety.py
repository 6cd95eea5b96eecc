"""``.pkl`` weights: a crafted pickle is refused before it runs anything; model-zoo files load."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from .d2_helpers import CONFIGS, LAZYCONFIG_TOOL, REPO_ROOT
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from himoe_plugin.detectron2 import RefusedPickleError, SafeDetectionCheckpointer


class _RunsCommand:
    """Unpickling this runs a shell command (what a crafted .pkl does)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)


def malicious_pkl(tmp_path, protocol):
    marker = tmp_path / f"pwned-{protocol}"
    path = tmp_path / f"evil-{protocol}.pkl"
    payload = {"model": {"fc.weight": _RunsCommand(f"touch {marker}")}, "__author__": "Detectron2 Model Zoo"}
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    return path, marker


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("checkpointer", [DetectionCheckpointer, SafeDetectionCheckpointer])
def test_crafted_pkl_is_refused_and_runs_nothing(tmp_path, protocol, checkpointer):
    path, marker = malicious_pkl(tmp_path, protocol)
    # Stock Detectron2 is patched on import of himoe_plugin.detectron2 (done by conftest).
    with pytest.raises(RefusedPickleError, match=rf"{path}: refused to load global '(posix|nt)\.system'"):
        checkpointer(TinyNet()).load(str(path))
    assert not marker.exists()
    # The file is a real exploit: plain pickle runs the command.
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.slow
def test_stock_lazyconfig_tool_refuses_a_crafted_init_checkpoint(tmp_path, data_root):
    """Detectron2's own lazyconfig_train_net.py: the LazyConfig imports the plugin, which patches
    the checkpointer before ``train.init_checkpoint`` is read."""
    path, marker = malicious_pkl(tmp_path, 2)
    command = [
        sys.executable, str(LAZYCONFIG_TOOL), "--eval-only",
        "--config-file", str(CONFIGS / "aquarium" / "himoe_faster_rcnn_R_18_FPN_aquarium.py"),
        "train.device=cpu", f"train.output_dir={tmp_path}", f"train.init_checkpoint={path}",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, HIMOE_DATA_ROOT=str(data_root)))
    assert run.returncode != 0
    assert f"RefusedPickleError: {path}: refused to load global" in run.stderr, run.stderr[-2000:]
    assert not marker.exists()


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "eval.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": np.zeros(2)}, "__author__": "x", "hook": print}))
    with pytest.raises(RefusedPickleError, match=r"builtins\.print"):
        DetectionCheckpointer(TinyNet()).load(str(path))


def numpy_state(model, offset=1.0):
    return {name: value.detach().numpy() + offset for name, value in model.state_dict().items()}


def assert_loaded(model, expected):
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[name], err_msg=name)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_detectron2_model_zoo_pkl_loads_into_the_model(tmp_path, protocol):
    model = TinyNet()
    weights = numpy_state(model)
    weights["stem.weight"] = np.asfortranarray(weights["stem.weight"])  # non-C-contiguous arrays too
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}, protocol=protocol))
    DetectionCheckpointer(model).load(str(path))
    assert_loaded(model, weights)


def test_numpy_2_module_paths_load(tmp_path):
    """numpy >= 2 pickles arrays through ``numpy._core``; numpy 1.26 reads those paths too."""
    model = TinyNet()
    weights = numpy_state(model, offset=2.0)
    data = pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}, protocol=2)
    assert b"numpy.core.multiarray" in data
    path = tmp_path / "numpy2.pkl"
    path.write_bytes(data.replace(b"numpy.core.multiarray", b"numpy._core.multiarray"))
    DetectionCheckpointer(model).load(str(path))
    assert_loaded(model, weights)


def test_name_matched_and_caffe2_pkls_load(tmp_path):
    model = TinyNet()
    # matching_heuristics: names are matched by suffix (here with an extra prefix).
    weights = numpy_state(model, offset=3.0)
    path = tmp_path / "heuristic.pkl"
    path.write_bytes(pickle.dumps(
        {"model": {f"module.{k}": v for k, v in weights.items()}, "__author__": "someone",
         "matching_heuristics": True},
        protocol=2,
    ))
    DetectionCheckpointer(model).load(str(path))
    assert_loaded(model, weights)
    # Caffe2 / Detectron1 layout: weights under "blobs" with Caffe2 names, momentum dropped.
    weights = numpy_state(model, offset=4.0)
    blobs = {name.replace(".weight", "_w").replace(".bias", "_b"): value for name, value in weights.items()}
    blobs["fc_w_momentum"] = np.zeros(1)
    path = tmp_path / "caffe2.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    DetectionCheckpointer(model).load(str(path))
    assert_loaded(model, weights)


@pytest.mark.slow
def test_publish_tool_turns_a_model_zoo_pkl_into_a_weights_only_pth(tmp_path):
    weights = numpy_state(TinyNet())
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}))
    publish = [sys.executable, str(REPO_ROOT / "tools" / "publish_detectron2_model.py")]
    run = subprocess.run(publish + [str(path), str(tmp_path / "zoo.pth")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    published = torch.load(run.stdout.strip(), map_location="cpu", weights_only=True)
    for name, value in weights.items():
        assert torch.equal(published["model"][name], torch.from_numpy(value)), name
    evil, marker = malicious_pkl(tmp_path, 2)
    run = subprocess.run(publish + [str(evil), str(tmp_path / "e.pth")], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "refused to load global 'posix.system'" in run.stderr
    assert not marker.exists()
