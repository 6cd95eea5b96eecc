"""HI-MoE Faster R-CNN (MMDetection) on real Aquarium images: upcycling, checkpoints, config
errors, empty images, statistics, super-class supervision, import and load guards."""
import copy
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from ..module_state import attribute_writes
from .mmdet_helpers import (DENSE_CONFIG, HIMOE_CONFIG, REPO_ROOT, build_model, load_config,
                           real_batch)
from mmdet.registry import DATASETS
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from mmengine.structures import InstanceData

import himoe_plugin.mmdet  # noqa: F401  (registers the modules)
from himoe_plugin.core import MoEConfigError
from himoe_plugin.mmdet import SceneSupervisionHook, supercategory_groups
from himoe_plugin.mmdet.checkpoint import history_buffer_method

EXPERT_PARAMS = ('moe_block.moe.experts.weights.0', 'moe_block.moe.experts.weights.1',
                 'moe_block.moe.experts.biases.0',
                 'moe_block.moe.experts.biases.1')
SCENE_SUPERVISION = {'model.roi_head.bbox_head.loss_scene':
                     dict(type='SceneSupervisionLoss', loss_weight=0.5)}


@pytest.fixture(scope='module', autouse=True)
def mmdet_scope():
    init_default_scope('mmdet')


def expert_grads(model):
    head = model.roi_head.bbox_head
    params = dict(head.named_parameters())
    return [params[name].grad for name in EXPERT_PARAMS]


@pytest.mark.parametrize('options', [
    {},
    {'model.roi_head.bbox_head.shared_expert': True},
    {'model.roi_head.bbox_head.moe_fc_layers': [1]},
], ids=['experts', 'shared-expert', 'second-fc-only'])
def test_upcycled_model_predicts_like_the_dense_checkpoint(tmp_path, options):
    """Experts (and the shared expert) start as the dense shared fcs, routers keep their
    init, and test-time detections equal the dense model's."""
    dense_cfg = load_config(DENSE_CONFIG)
    dense = build_model(dense_cfg, seed=1).eval()
    checkpoint = tmp_path / 'dense.pth'
    torch.save({'state_dict': dense.state_dict()}, checkpoint)

    moe_cfg = load_config(HIMOE_CONFIG, options)
    moe = build_model(moe_cfg, seed=2).eval()
    head = moe.roi_head.bbox_head
    router_init = copy.deepcopy(head.moe_block.router.state_dict())
    load_checkpoint(moe, str(checkpoint), strict=False)

    dense_head = dense.roi_head.bbox_head
    mapped = [line.split(', ')[0] for line in head.upcycle_report if 'shared expert' not in line]
    assert mapped == [
        f'roi_head.bbox_head.shared_fcs.{i}.weight' for i in head.moe_fc_layers]
    for name, value in head.moe_block.router.state_dict().items():
        assert torch.equal(value, router_init[name]), name
    first_expert_fc = dense_head.shared_fcs[head.moe_fc_layers[0]].weight
    assert all(torch.equal(w, first_expert_fc) for w in head.moe_block.moe.experts.weights[0])
    if head.moe_block.moe.shared is not None:
        assert torch.equal(head.moe_block.moe.shared.layers[0].weight, first_expert_fc)
    for index, fc in head.shared_fcs.items():  # dense layers outside the experts
        assert torch.equal(fc.weight, dense_head.shared_fcs[int(index)].weight)

    batch = real_batch(moe_cfg, moe, [0, 1, 2], split='val')
    with torch.no_grad():
        dense_out = dense.test_step(batch)
        moe_out = moe.test_step(batch)
    assert sum(len(out.pred_instances) for out in dense_out) > 0
    for d, m in zip(dense_out, moe_out):
        d, m = d.pred_instances, m.pred_instances
        assert torch.equal(d.labels, m.labels)
        torch.testing.assert_close(m.bboxes, d.bboxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(m.scores, d.scores, rtol=0, atol=1e-5)


def test_dense_checkpoint_that_does_not_fit_the_experts_fails_clearly(tmp_path):
    checkpoint = tmp_path / 'dense.pth'
    torch.save({'state_dict': build_model(load_config(DENSE_CONFIG)).state_dict()}, checkpoint)
    narrow = build_model(load_config(HIMOE_CONFIG, {
        'model.roi_head.bbox_head.expert_channels': 128}))
    with pytest.raises(ValueError, match=r"cannot upcycle 'roi_head\.bbox_head\.moe_block\.moe' from the "
                                         r"dense checkpoint: dense layers of shapes"):
        load_checkpoint(narrow, str(checkpoint), strict=False)


def test_checkpoint_with_another_expert_count_fails_clearly(tmp_path):
    cfg = load_config(HIMOE_CONFIG)
    checkpoint = tmp_path / 'moe6.pth'
    torch.save({'state_dict': build_model(cfg).state_dict()}, checkpoint)
    fewer = build_model(load_config(HIMOE_CONFIG, {
        'model.roi_head.bbox_head.router.num_experts': 3}))
    with pytest.raises(ValueError, match=r'roi_head\.bbox_head\.router\.num_experts: the '
                                         r'checkpoint has 6 experts .* built with 3'):
        load_checkpoint(fewer, str(checkpoint), strict=False)


def test_checkpoint_with_another_group_count_fails_clearly(tmp_path):
    """Same experts, other scene groups: mmengine would only warn about the scene router's
    shape and keep a re-initialised one; the guard names the key."""
    checkpoint = tmp_path / 'moe6_g3.pth'
    torch.save({'state_dict': build_model(load_config(HIMOE_CONFIG)).state_dict()}, checkpoint)
    two_groups = build_model(load_config(HIMOE_CONFIG, {
        'model.roi_head.bbox_head.router.num_groups': 2}))
    with pytest.raises(MoEConfigError, match=r"^roi_head\.bbox_head\.router\.num_groups=2: the "
                                             r"checkpoint's router .* chooses among 3 expert groups"):
        load_checkpoint(two_groups, str(checkpoint), strict=False)


@pytest.mark.parametrize('options, message', [
    ({'model.roi_head.bbox_head.router.top_k': 5},
     r'roi_head\.bbox_head\.router\.top_k=5: larger than the scene subset'),
    ({'model.roi_head.bbox_head.router.num_groups': 4},
     r'roi_head\.bbox_head\.router\.num_groups=4: must divide num_experts=6'),
    ({'model.roi_head.bbox_head.router.num_expert': 4},
     r'roi_head\.bbox_head\.router\.num_expert=4: unknown setting'),
    ({'model.roi_head.bbox_head.loss_balance.loss_weight': -1.0},
     r'roi_head\.bbox_head\.loss_balance\.loss_weight=-1\.0: must be >= 0'),
    ({'model.roi_head.bbox_head.loss_router_z.loss_weight': float('nan')},
     r'roi_head\.bbox_head\.loss_router_z\.loss_weight=nan: must be a finite number'),
    ({'model.roi_head.bbox_head.router.balance_loss_weight': 0.1},
     r'roi_head\.bbox_head\.router\.balance_loss_weight=0\.1: set it as '
     r'roi_head\.bbox_head\.loss_balance\.loss_weight'),
    ({'model.roi_head.bbox_head.shared_expert': True,
      'model.roi_head.bbox_head.shared_expert_weight': 1.5},
     r'roi_head\.bbox_head\.shared_expert_weight=1\.5: must be < 1'),
    ({'model.roi_head.bbox_head.moe_fc_layers': [1, 0]},
     r'roi_head\.bbox_head\.moe_fc_layers=\[1, 0\]: must be increasing, contiguous'),
    ({'model.roi_head.bbox_head.moe_fc_layers': [1, 2]},
     r'roi_head\.bbox_head\.moe_fc_layers=\[1, 2\]: the box head has fc layers 0\.\.1'),
    ({'model.roi_head.bbox_head.loss_balance': dict(_delete_=True, type='RouterZLoss')},
     r'roi_head\.bbox_head\.loss_balance\.type=.RouterZLoss.: must be a LoadBalancingLoss'),
    ({'model.roi_head.stats_period': 0}, r'roi_head\.stats_period=0: must be an integer >= 1'),
    ({'model.roi_head.scene_featmap_strides': [8, 16, 32]},
     r'roi_head\.scene_featmap_strides=\[8, 16, 32\]: the scene router pools the first '
     r'len\(strides\) neck levels, whose strides are \[4, 8, 16\]'),
])
def test_bad_settings_fail_naming_the_config_key(options, message):
    with pytest.raises(MoEConfigError, match=message):
        build_model(load_config(HIMOE_CONFIG, options))


def test_moe_roi_head_rejects_a_dense_bbox_head():
    with pytest.raises(MoEConfigError, match=r'roi_head\.bbox_head\.type=.Shared2FCBBoxHead.'):
        build_model(load_config(DENSE_CONFIG, {'model.roi_head.type': 'InstanceMoERoIHead'}))


def test_zero_gt_and_zero_proposal_images_train_and_predict():
    cfg = load_config(HIMOE_CONFIG)
    model = build_model(cfg)
    batch = real_batch(cfg, model, [0, 1])
    inputs, samples = batch['inputs'], batch['data_samples']
    assert all(len(s.gt_instances) > 0 for s in samples)

    # Whole detector, image 1 without ground truth.
    samples[1].gt_instances = samples[1].gt_instances[:0]
    model.train()
    loss, log_vars = model.parse_losses(model.loss(inputs, samples))
    assert torch.isfinite(loss)
    assert {'loss_moe_balance', 'loss_moe_scene_balance', 'loss_moe_z'} <= set(log_vars)
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in expert_grads(model))

    # RoI head: image 0 without proposals and ground truth, then both images.
    features = tuple(f.detach() for f in model.extract_feat(inputs))
    proposals = InstanceData(bboxes=torch.tensor([[10., 20., 120., 150.], [30., 40., 90., 200.],
                                                  [0., 0., 60., 60.]]))
    empty = InstanceData(bboxes=torch.zeros(0, 4))
    samples[0].gt_instances = samples[0].gt_instances[:0]
    for rpn_results in ([empty, proposals], [empty.clone(), empty.clone()]):
        model.zero_grad()
        losses = model.roi_head.loss(features, [r.clone() for r in rpn_results], samples)
        total = sum(v for k, v in losses.items() if 'loss' in k)
        assert torch.isfinite(total)
        assert torch.isfinite(losses['loss_moe_balance'])
        total.backward()
        assert all(g is not None and torch.isfinite(g).all() for g in expert_grads(model))

    model.eval()
    with torch.no_grad():
        features = model.extract_feat(inputs)
        results = model.roi_head.predict(features, [empty, proposals], samples)
        assert len(results[0]) == 0 and len(results[1]) > 0
        results = model.roi_head.predict(features, [empty, empty], samples)
        assert [len(r) for r in results] == [0, 0]
        # Tensor mode (FLOP counting): one row of scores per proposal.
        outs = model.roi_head.forward(features, [empty, proposals], samples)
        assert outs[0].shape == (3, cfg.model.roi_head.bbox_head.num_classes + 1)


def test_statistics_reach_the_message_hub_every_period():
    cfg = load_config(HIMOE_CONFIG, {'model.roi_head.stats_period': 2})
    model = build_model(cfg).train()
    batch = real_batch(cfg, model, [2, 3])
    hub = MessageHub.get_instance('himoe-statistics-test')
    for iteration, flushed in ((0, False), (1, True), (2, False)):
        hub.update_info('iter', iteration)
        model.loss(batch['inputs'], batch['data_samples'])
        loads = [hub.log_scalars.get(f'train/himoe/expert_load/{e}') for e in range(6)]
        if not flushed:
            assert all(b is None or len(b.data[0]) == 1 for b in loads)
            continue
        assert all(len(b.data[0]) == 1 for b in loads)
        assert abs(sum(b.current() for b in loads) - 1.0) < 1e-5
        usage = [hub.log_scalars[f'train/himoe/group_usage/{g}'].current() for g in range(3)]
        assert abs(sum(usage) - 2.0) < 1e-5  # scene_top_k groups per image
        assert hub.log_scalars['train/himoe/instances_per_image'].current() == 256


def test_supercategory_groups_of_aquarium(data_root):
    ann_file = str(data_root / 'aquarium/annotations/instances_train.json')
    # Sorted supercategories: bird, fish-like, invertebrate.
    assert supercategory_groups(ann_file, list(range(1, 8)), 3) == [1, 2, 0, 0, 1, 2, 1]
    with pytest.raises(MoEConfigError, match=r'roi_head\.bbox_head\.router\.num_groups=2: .* '
                                             r'has 3 \(bird, fish-like, invertebrate\)'):
        supercategory_groups(ann_file, list(range(1, 8)), 2)


def test_scene_supervision_from_dataset_supercategories():
    cfg = load_config(HIMOE_CONFIG, SCENE_SUPERVISION)
    model = build_model(cfg).train()
    batch = real_batch(cfg, model, [0, 1])
    with pytest.raises(RuntimeError, match="SceneSupervisionHook"):
        model.loss(batch['inputs'], batch['data_samples'])

    runner = SimpleNamespace(
        model=model,
        train_dataloader=SimpleNamespace(dataset=DATASETS.build(cfg.train_dataloader.dataset)))
    SceneSupervisionHook().before_train(runner)
    assert model.roi_head.class_to_group.tolist() == [1, 2, 0, 0, 1, 2, 1]
    losses = model.loss(batch['inputs'], batch['data_samples'])
    assert losses['loss_moe_scene_supervision'] > 0
    losses['loss_moe_scene_supervision'].backward()
    assert model.roi_head.bbox_head.moe_block.router.scene_router.weight.grad.abs().sum() > 0

    two_groups = load_config(HIMOE_CONFIG, {**SCENE_SUPERVISION,
                                           'model.roi_head.bbox_head.router.num_groups': 2})
    runner.model = build_model(two_groups)
    with pytest.raises(MoEConfigError, match=r'router\.num_groups=2: super-class supervision'):
        SceneSupervisionHook().before_train(runner)


def test_checkpoint_getattr_stand_in_only_returns_history_buffer_methods():
    assert history_buffer_method(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for owner, name in ((os, 'system'), (HistoryBuffer, '__init__'),
                        (HistoryBuffer, '_set_default_statistics'), (dict, 'get')):
        with pytest.raises(pickle.UnpicklingError, match='only public methods of HistoryBuffer'):
            history_buffer_method(owner, name)


@pytest.mark.slow
def test_import_without_mmdet_names_the_missing_package():
    code = ("import sys; sys.modules['mmdet'] = None\n"
            "try:\n    import himoe_plugin.mmdet\n"
            "except ImportError as err:\n    print(err)")
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "himoe_plugin.mmdet needs the 'mmdet' package, which is not installed" in result.stdout


def routed_predictions(model, inputs, samples, proposals):
    with torch.no_grad():
        features = model.extract_feat(inputs)
        return model.roi_head.predict(features, [p.clone() for p in proposals], samples)


def test_a_pass_keeps_nothing_on_the_heads_and_batches_do_not_interact():
    """Per-pass state (scene inputs, the routing of the predictions) lives in the pass: a
    prediction writes no attribute, and a batch's results do not depend on the one before."""
    cfg = load_config(HIMOE_CONFIG, {'model.test_cfg.rcnn.output_routing': True,
                                     'model.test_cfg.rcnn.score_thr': 0.0})
    model = build_model(cfg).eval()
    first = real_batch(cfg, model, [0, 1], split='val')
    second = real_batch(cfg, model, [2, 3], split='val')
    proposals = [InstanceData(bboxes=torch.tensor([[10., 20., 120., 150.], [30., 40., 90., 200.],
                                                   [0., 0., 60., 60.]])),
                 InstanceData(bboxes=torch.tensor([[5., 5., 100., 80.], [50., 60., 200., 210.]]))]
    with attribute_writes(model) as writes:
        routed_predictions(model, first['inputs'], first['data_samples'], proposals)
        after = routed_predictions(model, second['inputs'], second['data_samples'], proposals[::-1])
    assert writes == []
    fresh = routed_predictions(build_model(cfg).eval(), second['inputs'], second['data_samples'],
                               proposals[::-1])
    for a, b in zip(after, fresh):
        for field in ('scores', 'labels', 'experts', 'expert_weights'):
            assert torch.equal(a.get(field), b.get(field)), field


def test_output_routing_of_a_batch_without_proposals_has_empty_experts():
    cfg = load_config(HIMOE_CONFIG, {'model.test_cfg.rcnn.output_routing': True})
    model = build_model(cfg).eval()
    batch = real_batch(cfg, model, [0, 1], split='val')
    empty = InstanceData(bboxes=torch.zeros(0, 4))
    top_k = model.roi_head.bbox_head.moe_config.top_k
    for proposals in ([empty, empty], [empty, InstanceData(bboxes=torch.tensor([[5., 5., 90., 80.]]))]):
        results = routed_predictions(model, batch['inputs'], batch['data_samples'], proposals)
        assert results[0].experts.shape == (0, top_k) and results[0].experts.dtype == torch.long
        assert results[0].expert_weights.shape == (0, top_k)
        assert results[0].expert_weights.dtype == torch.float32
        assert 'roi_index' not in results[0] and 'roi_index' not in results[1]


def test_inference_is_dropless_by_default_so_an_image_does_not_depend_on_its_batch():
    """capacity_factor caps the experts' load in training only (eval_capacity_factor asks for a
    cap at inference): alone or next to another image, an image gets the same detections."""
    def results(eval_capacity_factor):
        cfg = load_config(HIMOE_CONFIG, {
            'model.roi_head.bbox_head.router.capacity_factor': 0.5,
            'model.roi_head.bbox_head.router.eval_capacity_factor': eval_capacity_factor,
            'model.test_cfg.rcnn.output_routing': True, 'model.test_cfg.rcnn.score_thr': 0.0})
        model = build_model(cfg).eval()
        batch = real_batch(cfg, model, [0, 1], split='val')
        proposals = [InstanceData(bboxes=boxes(40, seed=i)) for i in range(2)]
        with torch.no_grad():
            features = model.extract_feat(batch['inputs'])
            batched = model.roi_head.predict(features, [p.clone() for p in proposals],
                                             batch['data_samples'])[1]
            alone = model.roi_head.predict(tuple(f[1:] for f in features), [proposals[1].clone()],
                                           batch['data_samples'][1:])[0]
        return alone, batched

    alone, batched = results(0.0)
    assert len(alone) > 0
    for field in ('scores', 'labels', 'experts', 'expert_weights'):
        torch.testing.assert_close(alone.get(field), batched.get(field))
    capped, _ = results(0.5)
    assert (capped.expert_weights == 0).any()  # asked for: the cap drops assignments


def boxes(count, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * 200
    return torch.cat([xy, xy + 20 + torch.rand(count, 2, generator=g) * 100], 1)


def test_moe_bbox_head_in_a_one_stage_detector_says_what_is_supported():
    cfg = load_config(HIMOE_CONFIG)
    head = dict(type='MoEShared2FCBBoxHead', num_classes=7, in_channels=256, stacked_convs=4,
                feat_channels=256, anchor_generator=dict(type='AnchorGenerator', strides=[8]))
    with pytest.raises(MoEConfigError, match=r"one-stage detectors \(RetinaNet, FCOS, \.\.\.\) are not "
                                             r"supported\. HI-MoE supports two-stage detectors .*DETR"):
        from mmdet.registry import MODELS
        MODELS.build(head)
    from himoe_plugin.mmdet import check_supported_detector
    retina = copy.deepcopy(cfg.model)
    retina['type'] = 'RetinaNet'
    with pytest.raises(MoEConfigError, match=r"^model\.type='RetinaNet': .*roi_head.*HI-MoE supports two-stage"):
        check_supported_detector(retina)
    check_supported_detector(cfg.model)  # Faster R-CNN with InstanceMoERoIHead


@pytest.mark.slow
def test_stock_train_tool_rejects_hi_moe_settings_on_retinanet_naming_the_key(tmp_path):
    """Through ``tools/mmdet/run_tool.py train.py`` the check runs before mmdet builds the model
    (which would end in a raw ``TypeError: ... unexpected keyword argument 'roi_head'``)."""
    config = tmp_path / 'himoe_retinanet.py'
    config.write_text(f"_base_ = '{HIMOE_CONFIG}'\nmodel = dict(type='RetinaNet')\n")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'tools/mmdet/run_tool.py'), 'train.py', str(config),
         '--work-dir', str(tmp_path / 'work')], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "model.type='RetinaNet'" in result.stderr and 'HI-MoE supports two-stage' in result.stderr
    assert 'unexpected keyword argument' not in result.stderr
    assert not (tmp_path / 'work').exists() or not any((tmp_path / 'work').rglob('*.pth'))
