"""InstanceMoECascadeRoIHead (MMDetection): the stock Cascade R-CNN config edited per the docs
trains and evaluates with mmdet's own tools on Aquarium and keeps its three stages; route-once
reuse tracked through the resampling; misuse fails naming the config key."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from mmdet.registry import MODELS
from .mmdet_helpers import (CONFIG_DIR, REPO_ROOT, build_model, load_config, mmdet_stock_config,
                           mmdet_tools_dir, real_batch, slice_eval_config, subprocess_env,
                           without_roi_head, without_scope, write_config)
from mmengine.config import Config
from mmengine.registry import init_default_scope

import himoe_plugin.mmdet  # noqa: F401  (registers the modules)
from himoe_plugin.core import MoEConfigError

CASCADE_CONFIG = CONFIG_DIR / 'himoe-cascade-rcnn_r18_fpn_aquarium_cpu.py'
DENSE_CASCADE_CONFIG = CONFIG_DIR / 'cascade-rcnn_r18_fpn_aquarium_cpu.py'
COCO_CONFIGS = {
    'himoe-cascade-rcnn_r50_fpn_1x_coco.py': 'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
    'himoe-cascade-mask-rcnn_r50_fpn_1x_coco.py': 'cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py',
}
ROUTING_LOSSES = ('loss_moe_balance', 'loss_moe_scene_balance', 'loss_moe_z')
NO_GT_LATER = {f'model.train_cfg.rcnn.{stage}.sampler.add_gt_as_proposals': False for stage in (1, 2)}


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    init_default_scope('mmdet')


def load(options=None) -> Config:
    return load_config(CASCADE_CONFIG, options)


@pytest.mark.slow
def test_stock_train_tool_trains_and_evaluates_all_three_stages(tmp_path, himoe_data_root, valid_slice):
    config = write_config(tmp_path / 'cascade_cfg.py', CASCADE_CONFIG, f"""
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
model = dict(roi_head=dict(stats_period=1), test_cfg=dict(rpn=dict(max_per_img=100)))
{slice_eval_config(valid_slice, tmp_path / 'predictions.pkl')}
""")
    result = subprocess.run(
        [sys.executable, str(mmdet_tools_dir() / 'train.py'), str(config),
         '--work-dir', str(tmp_path / 'work_dir')],
        cwd=REPO_ROOT, env=subprocess_env(himoe_data_root), capture_output=True, text=True,
        timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = [json.loads(line) for line in
               next((tmp_path / 'work_dir').glob('*/vis_data/scalars.json')).read_text().splitlines()]
    steps = [s for s in scalars if 'loss' in s]
    assert [s['step'] for s in steps] == [1, 2]
    for stage in range(3):
        for name in ('loss_cls', 'loss_bbox', *ROUTING_LOSSES):
            assert f's{stage}.{name}' in steps[-1], (stage, name)
        loads = [steps[-1][f'himoe/stage{stage}/expert_load/{e}'] for e in range(6)]
        assert abs(sum(loads) - 1.0) < 1e-5
    assert any('coco/bbox_mAP' in s for s in scalars)


def routings_and_samples(model):
    """Capture every stage's routing and, in training, its sampling results and bbox results."""
    roi_head = model.roi_head
    captured = {'routings': [], 'sampling': [], 'bbox_results': []}
    hooks = [head.register_forward_hook(lambda m, i, o: captured['routings'].append(o[2]))
             for head in roi_head.bbox_head]
    bbox_loss = roi_head.bbox_loss

    def recording_bbox_loss(stage, x, sampling_results):
        captured['sampling'].append(sampling_results)
        results = bbox_loss(stage, x, sampling_results)
        captured['bbox_results'].append(results)
        return results

    roi_head.bbox_loss = recording_bbox_loss
    return captured, hooks


@pytest.mark.parametrize('route_once', [None, 'scene', 'instance'])
def test_every_parameter_trains_and_stage_losses_follow_who_routed(route_once):
    options = {'model.roi_head.route_once': route_once, **(NO_GT_LATER if route_once == 'instance' else {})}
    cfg = load(options=options)
    model = build_model(cfg).train()
    batch = real_batch(cfg, model, [0, 1])
    loss, log_vars = model.parse_losses(model.loss(batch['inputs'], batch['data_samples']))
    loss.backward()
    for name, param in model.named_parameters():  # nothing unused: DDP without find_unused_parameters
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for stage in range(3):
        has = {name for name in ROUTING_LOSSES if f's{stage}.{name}' in log_vars}
        if stage == 0 or not route_once:
            assert has == set(ROUTING_LOSSES), stage
        elif route_once == 'scene':
            assert has == {'loss_moe_balance', 'loss_moe_z'}, stage
        else:
            assert has == set(), stage
        assert f's{stage}.loss_cls' in log_vars


def test_route_once_instance_tracks_rois_through_resampling_in_training():
    """Every RoI a later stage samples uses the experts stage 0 chose for the RoI whose refined
    box it is (checked on the boxes themselves)."""
    cfg = load(options={'model.roi_head.route_once': 'instance', **NO_GT_LATER})
    model = build_model(cfg).train()
    batch = real_batch(cfg, model, [0, 1])
    captured, hooks = routings_and_samples(model)
    model.loss(batch['inputs'], batch['data_samples'])
    for hook in hooks:
        hook.remove()
    routings, sampling, bbox_results = captured['routings'], captured['sampling'], captured['bbox_results']
    head = model.roi_head.bbox_head[0]
    for stage in (1, 2):
        previous = bbox_results[stage - 1]
        coder = model.roi_head.bbox_head[stage - 1].bbox_coder
        rois, deltas = previous['rois'], previous['bbox_pred']
        refined = torch.cat([
            coder.decode(rois[rois[:, 0] == i, 1:], deltas[rois[:, 0] == i],
                         max_shape=sample.metainfo['img_shape'])
            for i, sample in enumerate(batch['data_samples'])])
        priors = torch.cat([s.priors for s in sampling[stage]])
        # Each sampled prior is exactly one refined box of the previous stage: find which.
        match = (priors[:, None, :] - refined[None, :, :]).abs().sum(-1).argmin(1)
        torch.testing.assert_close(refined[match], priors)
        assert torch.equal(routings[stage].expert_index, routings[stage - 1].expert_index[match])
        assert torch.equal(routings[stage].combine_weight, routings[stage - 1].combine_weight[match])
    assert head.moe_block.router.instance_router is not None


def test_route_once_reuses_stage0_routing_at_inference():
    for route_once in ('scene', 'instance'):
        options = {'model.roi_head.route_once': route_once, **NO_GT_LATER}
        model = build_model(load(options=options)).eval()
        later_routers = [h.moe_block.router for h in model.roi_head.bbox_head[1:]]
        assert all(r.scene_router is None for r in later_routers)
        assert all((r.instance_router is None) == (route_once == 'instance') for r in later_routers)
        batch = real_batch(load(), model, [0], split='val')
        captured, hooks = routings_and_samples(model)
        with torch.no_grad():
            results = model.test_step(batch)
        assert len(results[0].pred_instances) > 0
        first, *later = captured['routings']
        for routing in later:
            assert routing.scene is first.scene
            if route_once == 'instance':
                assert routing is first  # routed once: no copies, the dispatch plan too


def test_cpu_cascade_configs_differ_only_in_the_roi_head():
    himoe, dense = load(), load_config(DENSE_CASCADE_CONFIG)
    assert without_roi_head(himoe) == without_roi_head(dense)
    assert dense.model.roi_head.type == 'CascadeRoIHead' and len(dense.model.roi_head.bbox_head) == 3


@pytest.mark.parametrize('ours, stock', list(COCO_CONFIGS.items()))
def test_coco_cascade_configs_are_the_stock_ones_with_the_roi_head_swapped(ours, stock):
    himoe = Config.fromfile(str(REPO_ROOT / 'configs/mmdet' / ours))
    reference = Config.fromfile(str(mmdet_stock_config(stock)))
    assert without_roi_head(himoe) == without_roi_head(reference)
    with torch.device('meta'):  # structure only: three R50 bbox heads with 8 experts each
        roi_head = MODELS.build(himoe.model.roi_head, default_args=dict(
            train_cfg=himoe.model.train_cfg.rcnn, test_cfg=himoe.model.test_cfg.rcnn))
    stock_heads = without_scope(reference.model.roi_head.bbox_head)
    for stage, (head, stock_head) in enumerate(zip(roi_head.bbox_head, stock_heads)):
        assert type(head).__name__ == 'MoEShared2FCBBoxHead'
        assert head.moe_block.moe.experts.weights[0].shape == (8, 1024, 256 * 49)
        assert list(head.bbox_coder.stds) == list(stock_head['bbox_coder']['target_stds']), stage
        assert head.reg_class_agnostic and head.moe_block.stats_scope == f'stage{stage}'


@pytest.mark.parametrize('options, message', [
    ({'model.roi_head.type': 'InstanceMoERoIHead'},
     r"roi_head\.type='InstanceMoERoIHead': the config is a cascade \(roi_head\.num_stages is set "
     r"per stage\) .* use 'InstanceMoECascadeRoIHead'"),
    ({'model.roi_head.moe_bbox_head': None},
     r"roi_head\.moe_bbox_head=None: stage 0's bbox head is a dense Shared2FCBBoxHead"),
    ({'model.roi_head.route_once': 'stages'},
     r"roi_head\.route_once='stages': must be one of \('', 'scene', 'instance'\)"),
    ({'model.roi_head.route_once': 'instance'},
     r'train_cfg\.rcnn\[1\]\.sampler\.add_gt_as_proposals=True: .* set it to False'),
    ({'model.roi_head.bbox_head.1.type': 'SABLHead'},
     r"roi_head\.bbox_head\[1\]\.type='SABLHead': has no HI-MoE counterpart"),
])
def test_bad_cascade_settings_fail_at_build_naming_the_key(options, message):
    with pytest.raises(MoEConfigError, match=message):
        build_model(load(options=options))


def test_route_once_needs_the_same_experts_in_every_stage():
    cfg = load()
    heads = [dict(copy.deepcopy(h), type='MoEShared2FCBBoxHead') for h in cfg.model.roi_head.bbox_head]
    heads[2]['router'] = dict(type='HierarchicalRouter', num_experts=3, top_k=1, num_groups=3, scene_top_k=2)
    cfg.model.roi_head.bbox_head = heads
    cfg.model.roi_head.route_once = 'scene'
    with pytest.raises(MoEConfigError, match=r"roi_head\.route_once='scene': stage 2 has 3 experts in 3 "
                                             r"groups, stage 0 6 in 3"):
        build_model(cfg)


def test_moe_bbox_heads_under_the_stock_cascade_head_fail_naming_both_keys():
    cfg = load()
    cfg.model.roi_head.type = 'CascadeRoIHead'
    settings = cfg.model.roi_head.pop('moe_bbox_head')
    for key in ('route_once', 'stats_period'):
        cfg.model.roi_head.pop(key)
    cfg.model.roi_head.bbox_head = [dict(copy.deepcopy(h), type='MoEShared2FCBBoxHead', **settings)
                                    for h in cfg.model.roi_head.bbox_head]
    model = build_model(cfg).train()
    batch = real_batch(cfg, model, [0])
    with pytest.raises(MoEConfigError, match=r"roi_head\.bbox_head\.type='MoEShared2FCBBoxHead': an HI-MoE "
                                             r"bbox head runs only under an HI-MoE RoI head \(roi_head\.type="):
        model.loss(batch['inputs'], batch['data_samples'])
