"""The patched Detectron2 v0.6 works with numpy >= 1.24 (no np.bool / np.object aliases)."""
import numpy as np

from detectron2.structures import BitMasks, PolygonMasks
from detectron2.structures.masks import polygons_to_bitmask


def test_mask_utilities_run_without_removed_numpy_aliases():
    assert not polygons_to_bitmask([], 3, 4).any()
    square = [np.array([1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0])]
    bitmask = polygons_to_bitmask(square, 5, 5)
    assert bitmask.dtype == bool and bitmask[2, 2] and not bitmask[4, 4]
    masks = BitMasks.from_polygon_masks(PolygonMasks([square]), 5, 5)
    assert masks.tensor.sum() == bitmask.sum()
