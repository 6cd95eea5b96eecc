"""Two CPU processes (gloo) through the plugin's launcher and trainer: global routing."""
import pytest
import torch
from .d2_helpers import VALID_SLICE, small_cfg
from detectron2.utils import comm

from himoe_plugin.detectron2 import register_bundled_datasets, register_coco_dataset
from himoe_plugin.detectron2.engine import HIMoETrainer, launch


def ddp_main(output_dir, data_root, slice_json):
    register_bundled_datasets(data_root)
    register_coco_dataset(VALID_SLICE, slice_json, f"{data_root}/aquarium/images/valid")
    cfg = small_cfg(output_dir, extra=["SOLVER.MAX_ITER", "3", "MODEL.HIMOE.STATS_PERIOD", "1",
                                       "SOLVER.IMS_PER_BATCH", "2"])
    trainer = HIMoETrainer(cfg)
    per_step = []

    def record_losses(module, inputs, output):
        if module.training:
            per_step.append({k: v.item() for k, v in output[1].items()})

    trainer.model.module.roi_heads.register_forward_hook(record_losses)
    trainer.resume_or_load(resume=False)
    trainer.train()
    statistics = {
        name: [value for value, _ in history.values()]
        for name, history in trainer.storage.histories().items()
        if name.startswith("himoe/")
    }
    torch.save(
        {
            "world_size": comm.get_world_size(),
            "wrapped": type(trainer.model).__name__,
            "losses": per_step,
            "statistics": statistics,
        },
        f"{output_dir}/rank{comm.get_rank()}.pt",
    )


@pytest.mark.slow
def test_two_process_cpu_training_has_global_routing(registered, data_root, tmp_path):
    launch(ddp_main, 2, args=(str(tmp_path), str(data_root), str(registered["valid_slice_json"])))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["wrapped"] == "DistributedDataParallel"
        assert len(rank["losses"]) == 3
    for step in range(3):
        a, b = ranks[0]["losses"][step], ranks[1]["losses"][step]
        # Each rank trains on its own image: local task losses differ ...
        assert a["loss_cls"] != b["loss_cls"]
        # ... while the routing losses are computed from global statistics.
        for key in ("loss_moe_balance", "loss_moe_scene_balance", "loss_moe_z"):
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (step, key)
    assert ranks[0]["statistics"].keys() == ranks[1]["statistics"].keys()
    for name, values in ranks[0]["statistics"].items():
        assert len(values) == 3
        torch.testing.assert_close(torch.tensor(values), torch.tensor(ranks[1]["statistics"][name]))
    # 2 images (one per rank) each keep 2 of 4 groups: global usage sums to 2 per step.
    usage = sum(torch.tensor(ranks[0]["statistics"][f"himoe/group_usage/{g}"]) for g in range(4))
    torch.testing.assert_close(usage, torch.full((3,), 2.0))
