"""MMDetection Runner and stock tools with HI-MoE: train, validate, test, resume, DDP (CPU)."""
import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from .mmdet_helpers import (HIMOE_CONFIG, REPO_ROOT, TRAIN_ITERS, VALID_IMAGES,
                           dist_train_two_ranks, mmdet_tools_dir, slice_eval_config,
                           subprocess_env, write_config)
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

ROUTING_LOSSES = ('loss_moe_balance', 'loss_moe_scene_balance', 'loss_moe_z')
NUM_EXPERTS = 6


@pytest.mark.slow
def test_runner_trains_and_evaluates_with_routing_losses_and_statistics(trained_run):
    """Routing losses are optimised (summed into ``loss``) and logged, statistics reach
    the log through the MessageHub, and CocoMetric evaluates the valid slice."""
    assert len(trained_run.scalars) >= TRAIN_ITERS
    train_steps = [s for s in trained_run.scalars if 'loss' in s]
    assert [s['step'] for s in train_steps] == list(range(1, TRAIN_ITERS + 1))
    for step in train_steps:
        for name in ROUTING_LOSSES:
            assert np.isfinite(step[name]) and step[name] > 0, (name, step)
        loss_terms = sum(v for k, v in step.items() if k.startswith('loss_'))
        assert abs(step['loss'] - loss_terms) < 1e-3 * max(1.0, step['loss'])
        load = [step[f'himoe/expert_load/{e}'] for e in range(NUM_EXPERTS)]
        assert abs(sum(load) - 1.0) < 1e-5
        # scene_top_k=2 of 3 groups: every image keeps exactly two groups.
        usage = [step[f'himoe/group_usage/{g}'] for g in range(3)]
        assert abs(sum(usage) - 2.0) < 1e-5
        assert step['himoe/instances_per_image'] == 256  # rcnn sampler num
    for name in ROUTING_LOSSES:
        assert f'{name}: ' in trained_run.log, name
    # The console gets one compact routing line (HIMoELogProcessor); every statistic is in the
    # scalars file (checked above), not in the console line.
    assert 'himoe: load max ' in trained_run.log and 'routing_entropy ' in trained_run.log
    assert 'himoe/expert_load/0' not in trained_run.log

    assert set(trained_run.metrics) >= {'coco/bbox_mAP', 'coco/bbox_mAP_50'}
    assert all(0.0 <= v <= 1.0 for v in trained_run.metrics.values())
    with open(trained_run.val_predictions, 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == VALID_IMAGES
    assert sum(len(p['pred_instances']['scores']) for p in predictions) > 0


@pytest.mark.slow
def test_stock_test_tool_reproduces_validation_from_checkpoint(trained_run, tmp_path, data_root):
    """mmdet's own tools/test.py (subprocess, ``torch.load`` with its weights-only default)
    loads the checkpoint and predicts exactly what validation predicted in training."""
    out = tmp_path / 'test_predictions.pkl'
    result = subprocess.run(
        [sys.executable, str(mmdet_tools_dir() / 'test.py'), str(trained_run.config),
         str(trained_run.checkpoint), '--work-dir', str(tmp_path / 'work_dir'),
         '--out', str(out)],
        cwd=REPO_ROOT, env=subprocess_env(data_root), capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'coco/bbox_mAP:' in result.stdout + result.stderr
    with open(out, 'rb') as f:
        tested = pickle.load(f)
    with open(trained_run.val_predictions, 'rb') as f:
        validated = pickle.load(f)
    assert [p['img_id'] for p in tested] == [p['img_id'] for p in validated]
    for t, v in zip(tested, validated):
        t, v = t['pred_instances'], v['pred_instances']
        assert torch.equal(t['labels'], v['labels'])
        torch.testing.assert_close(t['bboxes'], v['bboxes'])
        torch.testing.assert_close(t['scores'], v['scores'])


class _ResumeProbe(Hook):
    """Records the model and optimizer state that training starts from."""

    def before_train(self, runner) -> None:
        self.iter = runner.iter
        self.state_dict = copy.deepcopy(runner.model.state_dict())
        self.optimizer = copy.deepcopy(runner.optim_wrapper.optimizer.state_dict())


@pytest.mark.slow
def test_resume_continues_from_saved_iteration_optimizer_and_router(trained_run, tmp_path):
    saved = torch.load(trained_run.checkpoint, map_location='cpu')  # weights_only default
    assert saved['meta']['iter'] == TRAIN_ITERS
    cfg = Config.fromfile(str(trained_run.config))
    cfg.work_dir = str(tmp_path / 'work_dir')
    cfg.resume = True
    cfg.load_from = str(trained_run.checkpoint)
    cfg.train_cfg.max_iters = TRAIN_ITERS + 1
    cfg.train_cfg.val_interval = 100
    cfg.default_hooks.checkpoint.interval = 100
    runner = Runner.from_cfg(cfg)
    probe = _ResumeProbe()
    runner.register_hook(probe, priority='LOWEST')
    runner.train()

    assert probe.iter == TRAIN_ITERS
    assert runner.iter == TRAIN_ITERS + 1
    router_keys = [k for k in saved['state_dict']
                   if '.router.' in k and not k.endswith(('.num_groups', '.instance_routing'))]
    # (weights and biases; the two buffers record the layout the checkpoint guards check)
    assert len(router_keys) == 4
    for key, value in saved['state_dict'].items():
        assert torch.equal(probe.state_dict[key], value), key
    momentum = [s['momentum_buffer'] for s in saved['optimizer']['state'].values()]
    resumed = [s['momentum_buffer'] for s in probe.optimizer['state'].values()]
    assert len(resumed) == len(momentum) > 0
    assert all(torch.equal(a, b) for a, b in zip(resumed, momentum))
    # Training went on from there: the router moved.
    final = runner.model.state_dict()
    assert any(not torch.equal(final[k], saved['state_dict'][k]) for k in router_keys)


@pytest.mark.slow
def test_ddp_two_cpu_processes_share_global_routing_losses(tmp_path, data_root, valid_slice):
    """tools/mmdet/dist_train.sh (gloo on CPU, ``launcher='pytorch'``, no
    ``find_unused_parameters``) trains 2 iterations on 2 processes. With one of three groups
    kept per image and 2 images per process, every process has experts without RoIs at
    every step; training still runs. Routing losses and statistics are global: identical on
    both ranks, while the detection losses of their different images differ."""
    probe_dir = tmp_path / 'probe'
    config = write_config(tmp_path / 'ddp_cfg.py', HIMOE_CONFIG, f"""
custom_imports = dict(imports=['himoe_plugin.mmdet', 'mmdet_probes'],
                      allow_failed_imports=False)
custom_hooks = [dict(type='RankScalarsProbe', out_dir={str(probe_dir)!r})]
train_cfg = dict(max_iters=2, val_interval=100)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=100))
model = dict(roi_head=dict(stats_period=1,
                           bbox_head=dict(router=dict(top_k=1, scene_top_k=1))))
{slice_eval_config(valid_slice, tmp_path / 'unused.pkl')}
""")
    ranks = dist_train_two_ranks(config, tmp_path / 'work_dir', probe_dir, data_root)
    assert sorted(ranks[0]) == sorted(ranks[1]) == ['1', '2']
    for step in ('1', '2'):
        rank0, rank1 = ranks[0][step], ranks[1][step]
        global_names = [k for k in rank0 if k.startswith(('loss_moe_', 'himoe/'))]
        assert set(ROUTING_LOSSES) <= set(global_names)
        assert len([k for k in global_names if k.startswith('himoe/')]) >= NUM_EXPERTS
        for name in global_names:
            assert rank0[name] == rank1[name], (step, name)
        assert rank0['loss_cls'] != rank1['loss_cls']
