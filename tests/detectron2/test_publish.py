"""Publishing Detectron2 checkpoints for a model zoo: the published file evaluates with Detectron2's
stock LazyConfig tool, and a published dense checkpoint upcycles into an HI-MoE model."""
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from .d2_helpers import CONFIGS, DENSE_YAML, REPO_ROOT, VALID_SLICE, small_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from himoe_plugin.detectron2.engine import HIMoETrainer

STOCK_TOOL = Path(sys.executable).parent.parent / "share" / "detectron2" / "tools" / "lazyconfig_train_net.py"


def publish(checkpoint: Path, out: Path) -> Path:
    run = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "publish_detectron2_model.py"), str(checkpoint),
                          str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    published = Path(run.stdout.strip())
    assert published.name.startswith(out.stem + "-") and published.is_file()
    return published


def training_checkpoint(path: Path) -> Path:
    torch.save({"model": {"roi_heads.box_head.fc1.weight": torch.randn(4, 3)}, "optimizer": {"state": {}},
                "scheduler": {"last_epoch": 5}, "iteration": 5}, path)
    return path


def test_publishing_a_checkpoint_onto_itself_is_refused_and_keeps_it(tmp_path, capsys):
    """Before: exit 0, and the training checkpoint (optimizer, scheduler, iteration) was gone."""
    checkpoint = training_checkpoint(tmp_path / "model_final.pth")
    before = checkpoint.read_bytes()
    main = runpy.run_path(str(REPO_ROOT / "tools" / "publish_detectron2_model.py"))["main"]
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(checkpoint), str(checkpoint), *extra])
        assert exit_info.value.code == 2
        assert "is the input checkpoint" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pth"]  # nothing else written


def test_an_existing_output_is_refused_unless_overwrite_is_asked(tmp_path, capsys):
    checkpoint = training_checkpoint(tmp_path / "model_final.pth")
    existing = tmp_path / "published.pth"
    existing.write_bytes(b"someone's file")
    main = runpy.run_path(str(REPO_ROOT / "tools" / "publish_detectron2_model.py"))["main"]
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), str(existing)])
    assert exit_info.value.code == 2 and "exists: pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"someone's file"
    published = main([str(checkpoint), str(existing), "--overwrite"])
    assert published.name.startswith("published-") and published.is_file()
    assert set(torch.load(published, map_location="cpu")) == {"model", "__author__"}
    # The hashed name exists now: publishing again is refused, then allowed with --overwrite.
    existing.unlink()
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), str(existing)])
    assert f"{published} exists" in capsys.readouterr().err
    assert main([str(checkpoint), str(existing), "--overwrite"]) == published
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["model_final.pth", published.name]
    assert torch.load(checkpoint, map_location="cpu")["iteration"] == 5


def copypaste_metrics(log: str):
    header = "copypaste: AP,AP50,AP75,APs,APm,APl"
    values = log.split(header)[1].splitlines()[1].split("copypaste:")[1].strip().split(",")
    return dict(zip(["AP", "AP50", "AP75"], (float(v) for v in values)))


@pytest.mark.slow
def test_published_checkpoint_evaluates_with_the_stock_lazyconfig_tool(himoe_checkpoint, registered, data_root,
                                                                       tmp_path):
    """lazyconfig_train_net.py --eval-only, unchanged, with the LazyConfig twin of the yaml the
    checkpoint was trained with, on the published file: the AP of in-process evaluation."""
    published = publish(himoe_checkpoint, tmp_path / "himoe_aquarium.pth")
    assert set(torch.load(published, map_location="cpu")) == {"model", "__author__"}
    config = tmp_path / "eval_slice.py"
    config.write_text(f'''
from detectron2.config import LazyConfig
from himoe_plugin.detectron2 import register_coco_dataset

register_coco_dataset("{VALID_SLICE}", "{registered['valid_slice_json']}", "{data_root / 'aquarium/images/valid'}")
_twin = LazyConfig.load("{CONFIGS / 'aquarium' / 'himoe_faster_rcnn_R_18_FPN_aquarium.py'}")
model, dataloader, optimizer, lr_multiplier, train = (
    _twin.model, _twin.dataloader, _twin.optimizer, _twin.lr_multiplier, _twin.train)
model.proposal_generator.post_nms_topk = (500, 300)  # the small test settings (d2_helpers)
model.roi_heads.box_predictor.test_score_thresh = -1.0
dataloader.test.dataset.names = "{VALID_SLICE}"
dataloader.test.num_workers = 0
''')
    run = subprocess.run(
        [sys.executable, str(STOCK_TOOL), "--config-file", str(config), "--eval-only",
         f"train.init_checkpoint={published}", f"train.output_dir={tmp_path / 'stock_eval'}", "train.device=cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    stock = copypaste_metrics(run.stdout + run.stderr)

    cfg = small_cfg(tmp_path / "in_process")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(published))
    expected = HIMoETrainer.test(cfg, model.eval())["bbox"]
    for name, value in stock.items():
        if math.isnan(expected[name]):
            assert math.isnan(value)
        else:
            assert value == pytest.approx(expected[name], abs=1e-3), name


@pytest.mark.slow
def test_published_dense_checkpoint_upcycles_into_the_himoe_model(registered, tmp_path):
    torch.manual_seed(0)
    dense = build_model(small_cfg(tmp_path, yaml=DENSE_YAML))
    torch.save({"model": dense.state_dict(), "iteration": 9, "optimizer": {}}, tmp_path / "dense_final.pth")
    published = publish(tmp_path / "dense_final.pth", tmp_path / "dense_aquarium.pth")
    assert set(torch.load(published, map_location="cpu")) == {"model", "__author__"}
    himoe = build_model(small_cfg(tmp_path))
    DetectionCheckpointer(himoe).load(str(published))
    head = himoe.roi_heads.box_head
    assert head.upcycle_report  # the dense fc6/fc7 were mapped onto the experts
    fc6 = dense.roi_heads.box_head.fc1.weight
    experts = head.moe_block.moe.experts.weights[0]
    assert all(torch.equal(expert, fc6) for expert in experts)
