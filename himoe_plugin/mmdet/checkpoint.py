"""Let ``torch.load(weights_only=True)`` (torch >= 2.6's default) read MMEngine checkpoints.

MMEngine saves, besides tensors, its message hub: ``HistoryBuffer`` objects holding float64
and int64 numpy arrays, numpy scalars (e.g. ``eta``), and each buffer's statistics methods,
which pickle (protocol 2) writes as ``getattr(HistoryBuffer, 'mean')``. Exactly these are
allow-listed; ``getattr`` is replaced by a lookup that only returns public methods of
``HistoryBuffer``.
"""
from __future__ import annotations

import inspect
import pickle
from typing import Callable

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

try:  # numpy >= 1.26 (numpy 2's name; 1.26 aliases numpy.core)
    from numpy._core import multiarray
except ImportError:  # older numpy
    from numpy.core import multiarray


def history_buffer_method(owner: type, name: str) -> Callable:
    """Stand-in for ``builtins.getattr`` in checkpoints: ``HistoryBuffer.<name>`` only.

    Raises ``pickle.UnpicklingError`` for anything else, so a checkpoint cannot use it to
    reach other attributes.
    """
    method = HistoryBuffer.__dict__.get(name) if owner is HistoryBuffer else None
    if name.startswith('_') or not inspect.isfunction(method):
        raise pickle.UnpicklingError(
            f'checkpoint asks for getattr({owner!r}, {name!r}); only public methods of '
            'HistoryBuffer are allowed')
    return method


def allow_mmengine_checkpoint_globals() -> None:
    """Allow-list the globals of MMEngine (0.10) training checkpoints; idempotent."""
    torch.serialization.add_safe_globals([
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.float64)),
        type(np.dtype(np.int64)),
        multiarray._reconstruct,
        multiarray.scalar,
        (history_buffer_method, 'builtins.getattr'),
    ])
