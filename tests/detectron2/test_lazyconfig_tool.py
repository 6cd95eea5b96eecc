"""Detectron2's stock tools/lazyconfig_train_net.py trains and evaluates our LazyConfig unchanged."""
import json
import os
import subprocess
import sys

import pytest
from .d2_helpers import CONFIGS, LAZYCONFIG_TOOL


@pytest.mark.slow
def test_stock_lazyconfig_train_net_runs_himoe(data_root, tmp_path):
    assert LAZYCONFIG_TOOL.is_file(), f"{LAZYCONFIG_TOOL} missing: tools/env/setup_env.sh installs it"
    command = [
        sys.executable, str(LAZYCONFIG_TOOL),
        "--config-file", str(CONFIGS / "aquarium" / "himoe_faster_rcnn_R_18_FPN_aquarium.py"),
        "train.max_iter=3", "train.log_period=1", "train.device=cpu", f"train.output_dir={tmp_path}",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        # Evaluate all 127 validation images quickly: 100 proposals, keep every detection.
        "model.proposal_generator.post_nms_topk=[500,100]",
        "model.roi_heads.box_predictor.test_score_thresh=-1.0",
    ]
    env = dict(os.environ, HIMOE_DATA_ROOT=str(data_root))
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    train_records = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in train_records] == [0, 1, 2]
    for record in train_records:
        assert {"loss_moe_balance", "loss_moe_scene_balance", "loss_moe_z"} <= set(record)
    output = run.stdout + run.stderr
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in output
    values = output.split("copypaste: AP,AP50,AP75,APs,APm,APl")[1].splitlines()[1]
    assert "nan" not in values  # there were predictions to score
    assert (tmp_path / "model_final.pth").is_file()
