"""Detectron2 test fixtures: the bundled datasets and an 8-image validation slice."""
import pytest
from .d2_helpers import COCO128_SLICE, VALID_SLICE, small_cfg, write_slice

from himoe_plugin.detectron2 import register_bundled_datasets, register_coco_dataset


@pytest.fixture(scope="session")
def registered(data_root, tmp_path_factory):
    """Bundled datasets plus 8-image slices of aquarium valid and of COCO128, registered once."""
    register_bundled_datasets(str(data_root))
    slices = tmp_path_factory.mktemp("slice")
    slice_json = write_slice(data_root, slices / "valid8.json")
    register_coco_dataset(VALID_SLICE, str(slice_json), str(data_root / "aquarium/images/valid"))
    coco128_json = write_slice(data_root, slices / "coco128_8.json",
                               source="coco128/annotations/instances_train.json")
    register_coco_dataset(COCO128_SLICE, str(coco128_json), str(data_root / "coco128/images"))
    return {"valid_slice": VALID_SLICE, "valid_slice_json": slice_json}


@pytest.fixture(scope="session")
def himoe_checkpoint(registered, tmp_path_factory):
    """2 training iterations of the HI-MoE Aquarium config (small settings); its final checkpoint."""
    from himoe_plugin.detectron2.engine import HIMoETrainer

    output_dir = tmp_path_factory.mktemp("d2_himoe_checkpoint")
    trainer = HIMoETrainer(small_cfg(output_dir, extra=["SOLVER.MAX_ITER", "2"]))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return output_dir / "model_final.pth"
