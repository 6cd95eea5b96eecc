"""tools/analyze_model.py on HI-MoE yaml configs: parameters (total vs active), FLOPs, structure."""
import re
import subprocess
import sys

import pytest
from .d2_helpers import HIMOE_YAML, REPO_ROOT, small_cfg
from detectron2.modeling import build_model

from himoe_plugin.core import count_parameters

# fc6 (256*7*7 -> 1024) and fc7 (1024 -> 1024) of the box head, with biases: one expert.
EXPERT_PARAMS = 256 * 7 * 7 * 1024 + 1024 + 1024 * 1024 + 1024


def test_active_parameters_leave_out_the_experts_a_roi_is_not_sent_to(registered, tmp_path):
    model = build_model(small_cfg(tmp_path, extra=["MODEL.HIMOE.TOP_K", "1"]))
    count = count_parameters(model)
    assert count.total == sum(p.numel() for p in model.parameters())
    assert count.experts == 8 * EXPERT_PARAMS
    assert count.active == count.total - 7 * EXPERT_PARAMS  # top-1 of 8 experts


@pytest.mark.slow
def test_analyze_model_tool_reports_parameters_flops_and_structure(registered, tmp_path, data_root):
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "analyze_model.py"),
        "--tasks", "parameter", "flop", "structure", "-n", "1", "--data-root", str(data_root),
        "--config-file", str(HIMOE_YAML),
        "MODEL.DEVICE", "cpu", "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "OUTPUT_DIR", str(tmp_path),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    count = count_parameters(build_model(small_cfg(tmp_path)))
    reported = re.search(r"HI-MoE parameters: total ([\d.]+) M, active per RoI ([\d.]+) M", log)
    assert reported, log[-3000:]
    assert float(reported.group(1)) == round(count.total / 1e6, 2)
    assert float(reported.group(2)) == round(count.active / 1e6, 2)
    assert "roi_heads.box_head.moe_block.moe.experts" in log  # parameter table
    assert re.search(r"Total GFlops: [\d.]+", log)
    assert "(moe_block): MoEBlock" in log  # structure
