"""Train HI-MoE Faster R-CNN on real data with Detectron2's trainer, evaluate, resume."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from .d2_helpers import HIMOE_YAML, REPO_ROOT, SMALL_OPTS, VALID_SLICE, small_cfg

from himoe_plugin.detectron2.engine import HIMoETrainer


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(registered, tmp_path_factory):
    """4 iterations on aquarium train (checkpoints at iterations 2 and 4), then COCO eval."""
    output_dir = tmp_path_factory.mktemp("d2_train")
    cfg = small_cfg(output_dir)
    trainer = HIMoETrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = HIMoETrainer.test(cfg, trainer.model)
    return {"cfg": cfg, "output_dir": output_dir, "results": results, "trainer": trainer}


def test_training_reports_finite_task_and_routing_losses(trained):
    records = [r for r in read_metrics(trained["output_dir"]) if "total_loss" in r]
    assert [r["iteration"] for r in records] == [3]  # PeriodicWriter writes the last iteration
    record = records[0]
    for key in ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_moe_balance",
                "loss_moe_scene_balance", "loss_moe_z"):
        assert math.isfinite(record[key]), key
    storage = trained["trainer"].storage
    loss_keys = [k for k in storage.histories() if k.startswith("loss_")]
    assert {"loss_moe_balance", "loss_moe_scene_balance", "loss_moe_z"} <= set(loss_keys)
    totals = storage.history("total_loss").values()
    assert len(totals) == 4
    for step, (total, _) in enumerate(totals):  # Detectron2 sums every loss_* entry
        assert total == pytest.approx(sum(storage.history(k).values()[step][0] for k in loss_keys), rel=1e-5)


def test_routing_statistics_reach_the_event_storage_and_metrics(trained):
    storage = trained["trainer"].storage
    assert [it for _, it in storage.history("himoe/expert_load/0").values()] == [1, 3]
    record = [r for r in read_metrics(trained["output_dir"]) if "total_loss" in r][-1]
    for step in range(2):
        stats = {k: h.values()[step][0] for k, h in storage.histories().items() if k.startswith("himoe/")}
        loads = [stats[f"himoe/expert_load/{e}"] for e in range(8)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-4)
        usage = [stats[f"himoe/group_usage/{g}"] for g in range(4)]
        assert sum(usage) == pytest.approx(2.0, abs=1e-4)  # each image keeps 2 of 4 groups
        assert stats["himoe/dropped_fraction"] == 0.0  # dropless
        assert 0 < stats["himoe/routing_entropy"] <= math.log(4) + 1e-4
        assert stats["himoe/instances_per_image"] == pytest.approx(256)
        assert 0 <= stats["himoe/unused_experts"] <= 8
    assert set(stats) <= set(record)  # the writers (metrics.json, TensorBoard) got them
    assert record["himoe/expert_load/0"] == pytest.approx(stats["himoe/expert_load/0"])


def test_coco_evaluation_returns_ap_fields(trained):
    bbox = trained["results"]["bbox"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP-fish", "AP-penguin"):
        assert key in bbox
        assert bbox[key] is not None and (math.isnan(bbox[key]) or 0.0 <= bbox[key] <= 100.0)
    # With a score threshold of -1 there are detections, so the overall APs are numbers (only
    # size or class buckets without ground truth in the slice may be NaN).
    assert all(math.isfinite(bbox[key]) for key in ("AP", "AP50", "AP75"))


def test_inference_outputs_are_stock_instances(trained, registered):
    from detectron2.data import build_detection_test_loader

    model = trained["trainer"].model.eval()
    loader = build_detection_test_loader(trained["cfg"], VALID_SLICE)
    batch = next(iter(loader))
    with torch.no_grad():
        outputs = model(batch)
    instances = outputs[0]["instances"]
    assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert len(instances) > 0
    assert instances.pred_classes.max() < 7


@pytest.mark.slow
def test_resume_restores_iteration_optimizer_and_router(trained, tmp_path):
    saved_path = trained["output_dir"] / "model_0000001.pth"
    saved = torch.load(saved_path, map_location="cpu")
    assert saved["iteration"] == 1
    shutil.copy(saved_path, tmp_path / "model_0000001.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")

    trainer = HIMoETrainer(small_cfg(tmp_path))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    model_state = trainer.model.state_dict()
    for key in ("roi_heads.box_head.moe_block.router.instance_router.weight",
                "roi_heads.box_head.moe_block.router.scene_router.weight",
                "roi_heads.box_head.moe_block.moe.experts.weights.0"):
        assert torch.equal(model_state[key], saved["model"][key]), key
    # Training moved on after iteration 1, so matching it means resume restored that state.
    final = torch.load(trained["output_dir"] / "model_final.pth", map_location="cpu")["model"]
    key = "roi_heads.box_head.moe_block.router.instance_router.weight"
    assert not torch.equal(final[key], saved["model"][key])
    optimizer_state = trainer.optimizer.state_dict()["state"]
    saved_optimizer = saved["trainer"]["_trainer"]["optimizer"]["state"]
    assert optimizer_state.keys() == saved_optimizer.keys()
    for index, state in saved_optimizer.items():
        assert torch.equal(optimizer_state[index]["momentum_buffer"], state["momentum_buffer"])
    assert trainer.scheduler.last_epoch == saved["trainer"]["hooks"]["LRScheduler"]["last_epoch"]
    trainer.train()  # continues with iterations 2 and 3 only
    assert [it for _, it in trainer.storage.history("total_loss").values()] == [2, 3]
    assert [r["iteration"] for r in read_metrics(tmp_path) if "total_loss" in r] == [3]


@pytest.mark.slow
def test_eval_only_entry_point_matches_in_process_evaluation(trained, registered, data_root):
    """tools/train_net.py --eval-only on the trained checkpoint, in a fresh process."""
    output_dir = trained["output_dir"]
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "train_net.py"),
        "--config-file", str(HIMOE_YAML), "--eval-only", "--data-root", str(data_root),
        "--register", VALID_SLICE, str(registered["valid_slice_json"]),
        str(data_root / "aquarium/images/valid"),
    ] + SMALL_OPTS + [
        "OUTPUT_DIR", str(output_dir / "eval_only"),
        "MODEL.WEIGHTS", str(output_dir / "model_final.pth"),
        "DATASETS.TEST", f"('{VALID_SLICE}',)",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (output_dir / "eval_only" / "log.txt").read_text()
    header = "copypaste: AP,AP50,AP75,APs,APm,APl"
    assert header in log
    values = log.split(header)[1].splitlines()[1].split("copypaste:")[1].strip().split(",")
    expected = trained["results"]["bbox"]
    for name, value in zip(["AP", "AP50", "AP75"], values):
        if math.isnan(expected[name]):
            assert value == "nan"
        else:
            assert float(value) == pytest.approx(expected[name], abs=1e-3)


@pytest.mark.slow
def test_published_checkpoint_holds_only_the_weights_and_loads(trained, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "publish_detectron2_model.py"),
         str(trained["output_dir"] / "model_final.pth"), str(tmp_path / "himoe_aquarium.pth")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    published = Path(run.stdout.strip())
    assert published.name.startswith("himoe_aquarium-") and published.is_file()
    assert set(torch.load(published, map_location="cpu")) == {"model", "__author__"}
    model = build_model(small_cfg(tmp_path))
    DetectionCheckpointer(model).load(str(published))
    trained_state = trained["trainer"].model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained_state[name]), name
