"""The shipped configs: stock inheritance, only the RoI head swapped, tools around them."""
import subprocess
import sys
import time

import pytest
import torch
from mmdet.registry import MODELS
from .mmdet_helpers import (DENSE_CONFIG, HIMOE_CONFIG, REPO_ROOT, mmdet_stock_config,
                           subprocess_env, without_roi_head, without_scope, write_config)
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner, load_checkpoint

import himoe_plugin.mmdet  # noqa: F401  (registers the modules)

COCO_CONFIG = REPO_ROOT / 'configs/mmdet/himoe-faster-rcnn_r50_fpn_1x_coco.py'
#: Every shipped MMDetection config whose model has HI-MoE layers (named ``himoe-*``).
HIMOE_CONFIGS = sorted(p for p in (REPO_ROOT / 'configs/mmdet').rglob('himoe-*.py') if '_base_' not in p.parts)
HIMOE_MODEL_TYPES = ('InstanceMoE', 'HIMoE', 'MoE')


def test_every_himoe_config_has_the_plugin_runtime_the_docs_promise():
    """Before: the cascade and Mask R-CNN configs had no custom_hooks (mmdet's publish_model.py
    failed on their checkpoints, no himoe/* statistics were logged)."""
    assert len(HIMOE_CONFIGS) >= 17
    missing = []
    for path in HIMOE_CONFIGS:
        cfg = Config.fromfile(str(path))
        hooks = [hook['type'] for hook in cfg.get('custom_hooks', [])]
        name = path.relative_to(REPO_ROOT)
        if 'himoe_plugin.mmdet' not in cfg.custom_imports.imports:
            missing.append(f'{name}: custom_imports')
        for hook in ('RoutingStatisticsHook', 'WeightsOnlyCheckpointHook'):
            if hook not in hooks:
                missing.append(f'{name}: custom_hooks {hook}')
        if cfg.log_processor.get('type') != 'HIMoELogProcessor':
            missing.append(f"{name}: log_processor type='HIMoELogProcessor'")
    assert not missing, missing


def test_only_the_himoe_configs_build_himoe_models():
    """The glob above finds every HI-MoE config: the others name no plugin module."""
    for path in sorted((REPO_ROOT / 'configs/mmdet').rglob('*.py')):
        if path in HIMOE_CONFIGS or '_base_' in path.parts:
            continue
        cfg = Config.fromfile(str(path))
        types = [str(v) for v in _types(cfg.model.to_dict())]
        assert not [t for t in types if t.startswith(HIMOE_MODEL_TYPES)], path
        assert not cfg.get('custom_imports'), path


def _types(value):
    if isinstance(value, dict):
        yield from ([value['type']] if 'type' in value else [])
        for item in value.values():
            yield from _types(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _types(item)


def test_coco_config_is_the_stock_one_with_the_roi_head_swapped():
    stock_path = mmdet_stock_config('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    himoe, stock = Config.fromfile(str(COCO_CONFIG)), Config.fromfile(str(stock_path))
    assert without_roi_head(himoe) == without_roi_head(stock)
    assert himoe.custom_imports.imports == ['himoe_plugin.mmdet']
    himoe_head = without_scope(himoe.model.roi_head.bbox_head.to_dict())
    for key, value in without_scope(stock.model.roi_head.bbox_head.to_dict()).items():
        assert key == 'type' or himoe_head[key] == value, key
    init_default_scope('mmdet')
    model = MODELS.build(himoe.model)
    head = model.roi_head.bbox_head
    assert type(model.roi_head).__name__ == 'InstanceMoERoIHead'
    assert head.moe_block.moe.experts.weights[0].shape == (8, 1024, 256 * 7 * 7)
    assert head.moe_config.num_experts == 8 and head.moe_config.top_k == 2


def test_cpu_configs_differ_only_in_the_roi_head():
    himoe, dense = Config.fromfile(str(HIMOE_CONFIG)), Config.fromfile(str(DENSE_CONFIG))
    assert without_roi_head(himoe) == without_roi_head(dense)
    assert himoe.model.roi_head.type == 'InstanceMoERoIHead'
    assert dense.model.roi_head.type == 'StandardRoIHead'
    assert dense.model.backbone.init_cfg is None and dense.model.backbone.depth == 18


@pytest.mark.slow
def test_default_runs_of_the_aquarium_configs_are_reproducible(tmp_path):
    """The configs are seeded (42, like the Detectron2 twin): two default runs of 2 iterations
    draw the same initial weights and data order, so their losses and weights are identical."""
    config = write_config(tmp_path / 'himoe_cfg.py', HIMOE_CONFIG, """
train_cfg = dict(max_iters=2, val_interval=1000)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1000))
""")
    runs = []
    for name in ('first', 'second'):
        cfg = Config.fromfile(str(config))
        assert cfg.randomness.seed == 42
        cfg.work_dir = str(tmp_path / name)
        # Own names: MMEngine keeps visualizers and message hubs as process-wide named instances,
        # and a later Runner asking for the config's 'visualizer' would get this run's one.
        cfg.experiment_name = f'reproducibility_{name}'
        cfg.visualizer.name = f'reproducibility_{name}'
        runner = Runner.from_cfg(cfg)
        runner.train()
        losses = runner.message_hub.get_scalar('train/loss').data[0].tolist()
        runs.append((losses, {k: v.clone() for k, v in runner.model.state_dict().items()}))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert len(losses_a) == 2 and losses_a == losses_b
    assert weights_a.keys() == weights_b.keys()
    for key, value in weights_a.items():
        assert torch.equal(value, weights_b[key]), key


@pytest.mark.slow
def test_publish_model_through_run_tool(trained_run, tmp_path, data_root):
    """mmdet's publish_model.py (via tools/mmdet/run_tool.py) strips the optimizer; the
    published HI-MoE checkpoint loads strictly and reproduces the trained weights."""
    out = tmp_path / 'himoe_aquarium.pth'
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'tools/mmdet/run_tool.py'),
         'model_converters/publish_model.py', str(trained_run.checkpoint), str(out)],
        cwd=REPO_ROOT, env=subprocess_env(data_root), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for _ in range(100):  # publish_model.py renames the file in a background `mv`
        published = list(tmp_path.glob('himoe_aquarium-*.pth'))
        if published:
            break
        time.sleep(0.1)
    assert len(published) == 1
    checkpoint = torch.load(published[0], map_location='cpu')
    assert sorted(checkpoint) == ['meta', 'state_dict']
    init_default_scope('mmdet')
    model = MODELS.build(Config.fromfile(str(trained_run.config)).model)
    load_checkpoint(model, str(published[0]), strict=True)
    trained = torch.load(trained_run.checkpoint, map_location='cpu')['state_dict']
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
