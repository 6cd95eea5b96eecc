"""Safe loading of Detectron2 / Caffe2 model-zoo ``.pkl`` weights.

Detectron2 v0.6 reads ``MODEL.WEIGHTS some.pkl`` with plain ``pickle.load``
(``DetectionCheckpointer._load_file``), so a crafted ``.pkl`` runs arbitrary code when loaded.
Model-zoo ``.pkl`` files hold only dicts, lists, tuples, numbers, strings and numpy arrays:
``load_pkl`` unpickles exactly that and refuses every other global with ``RefusedPickleError``,
naming the file and the global. ``.pth`` files already load through ``torch.load``, which is
restricted to weights by default since torch 2.6.

``SafeDetectionCheckpointer`` uses it; importing ``himoe_plugin.detectron2`` also installs the
same ``_load_file`` on Detectron2's ``DetectionCheckpointer`` (``install_safe_pkl_loading``),
so stock tools (``lazyconfig_train_net.py``) are covered once the plugin is imported. Only
``.pkl`` loading changes; what follows the unpickling (model-zoo or Caffe2 layout, name
matching) is what Detectron2 does.
"""
from __future__ import annotations

import pickle
from typing import Any, BinaryIO, Dict

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

#: The globals numpy arrays, dtypes and scalars reduce to under pickle protocols 0-5, with the
#: module paths of numpy 1.x (``numpy.core``) and 2.x (``numpy._core``), plus what Python
#: itself uses for bytes (protocol 2) and ordered dicts.
ALLOWED_GLOBALS = frozenset(
    [(core + ".multiarray", name) for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")]
    + [(core + ".numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")]
)

_STOCK_LOAD_FILE = DetectionCheckpointer._load_file


class RefusedPickleError(pickle.UnpicklingError):
    """A ``.pkl`` file refers to a global that model-zoo weights never contain."""

    def __init__(self, filename: str, module: str, name: str):
        self.filename, self.module, self.name = filename, module, name
        super().__init__(
            f"{filename}: refused to load global '{module}.{name}'. Detectron2/Caffe2 model-zoo "
            ".pkl files hold only dicts, lists, numbers, strings and numpy arrays; anything else "
            "can run code when unpickled. If you trust this file, convert it to a .pth with "
            "torch.save({'model': state_dict}) from a trusted environment."
        )


class _ModelZooUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, filename: str):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 (Caffe2) pickles of arrays
        self.filename = filename

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedPickleError(self.filename, module, name)
        return super().find_class(module, name)


def load_pkl(filename: str) -> Any:
    """Unpickle a model-zoo ``.pkl`` (local path or any path Detectron2's PathManager opens).

    Raises ``RefusedPickleError`` naming the file and the global on anything but dicts, lists,
    tuples, numbers, strings and numpy arrays; no code from the file runs.
    """
    with PathManager.open(filename, "rb") as f:
        return _ModelZooUnpickler(f, filename).load()


def _load_file(self: DetectionCheckpointer, filename: str) -> Dict[str, Any]:
    """``DetectionCheckpointer._load_file`` with ``.pkl`` files unpickled by ``load_pkl``."""
    if not filename.endswith(".pkl"):
        return _STOCK_LOAD_FILE(self, filename)
    data = load_pkl(filename)
    if not isinstance(data, dict):
        raise ValueError(f"{filename}: not a model-zoo checkpoint (a {type(data).__name__}, not a dict)")
    if "model" in data and "__author__" in data:  # Detectron2 model zoo
        self.logger.info("Reading a file from '{}'".format(data["__author__"]))
        return data
    # Caffe2 / Detectron1 model zoo: detection models keep their weights under "blobs".
    data = data.get("blobs", data)
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that loads ``.pkl`` files with ``load_pkl``."""

    _load_file = _load_file


def install_safe_pkl_loading() -> None:
    """Make Detectron2's own ``DetectionCheckpointer`` load ``.pkl`` files with ``load_pkl``.

    A patch of one method (idempotent): ``DetectionCheckpointer._load_file`` becomes
    ``SafeDetectionCheckpointer._load_file``, which hands every other extension to the original.
    """
    DetectionCheckpointer._load_file = _load_file
