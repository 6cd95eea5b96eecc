"""HI-MoE DINO (and the DETR family): configs, masking of padding and DN queries, routing losses,
dense equivalence at upcycling (copy and split), the stock tools."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from .mmdet_helpers import (CONFIG_DIR, REPO_ROOT, dist_train_two_ranks, slice_eval_config,
                           subprocess_env, write_config)
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope

import himoe_plugin.mmdet  # noqa: F401  (registers HIMoEDINO & co.)
from himoe_plugin.core import MoEConfigError

DINO_CONFIGS = REPO_ROOT / 'configs' / 'mmdet' / 'dino'
HIMOE_DINO_CPU = CONFIG_DIR / 'himoe-dino-4scale_r18_aquarium_cpu.py'
DENSE_DINO_CPU = CONFIG_DIR / 'dino-4scale_r18_aquarium_cpu.py'
ROUTING_LOSSES = ('loss_moe_balance', 'loss_moe_scene_balance', 'loss_moe_z')


def build(config: Path, options: dict = None):
    from mmdet.registry import MODELS

    init_default_scope('mmdet')
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict({'model.backbone.init_cfg': None, **(options or {})})
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model, cfg


def real_batch(model, cfg, training=True):
    """A portrait and a landscape Aquarium train image (so the batch is padded), through the
    config's own pipeline and the model's data preprocessor."""
    from mmdet.registry import DATASETS

    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    portrait = landscape = None
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        if info['height'] > info['width'] and portrait is None:
            portrait = i
        if info['width'] > info['height'] and landscape is None:
            landscape = i
    data = pseudo_collate([dataset[portrait], dataset[landscape]])
    return model.data_preprocessor(data, training)


@pytest.fixture(scope='module')
def himoe_dino():
    return build(HIMOE_DINO_CPU)


# ---------------------------------------------------------------- configs

ABLATIONS = {
    'himoe-dino-4scale_r50_8xb2-12e_coco.py': dict(enc=True, E=16, G=4, ks=2, k=2, shared=True),
    'himoe-dino-4scale_r50_token-level_8xb2-12e_coco.py': dict(enc=True, E=16, G=1, ks=1, k=2),
    'himoe-dino-4scale_r50_instance-only_8xb2-12e_coco.py': dict(enc=False, E=16, G=1, ks=1, k=2),
    'himoe-dino-4scale_r50_scene-only_8xb2-12e_coco.py': dict(enc=True, E=16, G=16, ks=2, k=2,
                                                               scene_only=True),
    'himoe-dino-4scale_r50_k1_8xb2-12e_coco.py': dict(enc=True, E=16, G=4, ks=2, k=1),
    'himoe-dino-4scale_r50_k4_8xb2-12e_coco.py': dict(enc=True, E=16, G=4, ks=2, k=4),
    'himoe-dino-4scale_r50_e4_8xb2-12e_coco.py': dict(enc=True, E=4, G=4, ks=2, k=2),
    'himoe-dino-4scale_r50_e8_8xb2-12e_coco.py': dict(enc=True, E=8, G=4, ks=2, k=2),
    'himoe-dino-4scale_r50_split-e8k2_8xb2-12e_coco.py': dict(enc=True, E=8, G=4, ks=2, k=2,
                                                               hidden=256, shared=False),
}


@pytest.mark.parametrize('name', sorted(ABLATIONS))
def test_ablation_configs_inherit_stock_dino_and_build_what_they_say(name):
    """Each config of the paper's grid edits ``mmdet::dino/...`` and builds the stated model
    (one encoder and one decoder layer here, to keep the R50 build cheap)."""
    expected = ABLATIONS[name]
    cfg = Config.fromfile(str(DINO_CONFIGS / name))
    assert cfg.model.num_queries == 900 and cfg.model.type == 'HIMoEDINO'  # the stock DINO
    model, _ = build(DINO_CONFIGS / name, {'model.encoder.num_layers': 1,
                                          'model.decoder.num_layers': 1})
    ffns = {ffn.stats_scope: ffn for ffn in model.moe_ffns}
    assert sorted(ffns) == (['decoder.0', 'encoder.0'] if expected['enc'] else ['decoder.0'])
    for ffn in ffns.values():
        config = ffn.config
        assert (config.num_experts, config.groups, config.scene_top_k, config.top_k) == (
            expected['E'], expected['G'], expected['ks'], expected['k'])
        block = ffn.moe_block
        assert (block.moe.shared is not None) == expected.get('shared', True)
        assert block.moe.dims == (256, expected.get('hidden', 2048), 256)
        assert (block.router.instance_router is None) == expected.get('scene_only', False)


@pytest.mark.parametrize('options, message', [
    ({'model.moe.router.top_k': 9}, r'^moe\.router\.top_k=9: larger than the scene subset'),
    ({'model.moe.encoder_layers': [3]}, r'^moe\.encoder_layers=\[3\]: layer indices must be in 0\.\.2'),
    ({'model.moe.encoder_layers': [], 'model.moe.decoder_layers': []},
     r'^moe\.encoder_layers=\[\]: no MoE layer'),
    ({'model.moe.upcycle': dict(mode='slice')}, r"^moe\.upcycle\.mode='slice': must be one of"),
    ({'model.moe.upcycle': dict(mode='split'), 'model.moe.router.num_experts': 6,
      'model.moe.router.num_groups': 3}, r'^moe\.upcycle\.mode=.split.: feedforward_channels=1024'),
    ({'model.moe.upcycle': dict(noise_std=float('nan'))}, r'^moe\.upcycle\.noise_std=nan'),
    ({'model.moe.stats_period': 0}, r'^moe\.stats_period=0: must be an integer >= 1'),
    ({'model.moe.loss_router_z.type': 'LoadBalancingLoss'},
     r'^moe\.loss_router_z\.type=.LoadBalancingLoss.: must be a RouterZLoss'),
    ({'model.moe.router.balance_loss_weight': 0.1},
     r'^moe\.router\.balance_loss_weight=0\.1: set it as moe\.loss_balance\.loss_weight'),
    ({'model.moe.experts': 4}, r'^moe\.experts=4: unknown setting'),
    # issue 16, failure 7: bare TypeErrors before
    ({'model.moe.encoder_layers': None},
     r"^moe\.encoder_layers=None: must be 'all' or a list of layer indices"),
    ({'model.moe.encoder_layers': 1.5},
     r"^moe\.encoder_layers=1\.5: must be 'all' or a list of layer indices"),
    ({'model.moe.router': None}, r'^moe\.router=None: must be a dict of HierarchicalRouter settings'),
    ({'model.encoder.layer_cfg.ffn_cfg.act_cfg': dict(type='GELU')},
     r"^encoder\.layer_cfg\.ffn_cfg\.act_cfg=.*GELU.*: MoE FFN experts use ReLU"),
])
def test_bad_moe_settings_fail_naming_the_config_key(options, message):
    with pytest.raises(MoEConfigError, match=message):
        build(HIMOE_DINO_CPU, options)


# ---------------------------------------------------------------- masking

def _encoder_inputs(model, cfg):
    inputs = real_batch(model, cfg)
    feats = model.extract_feat(inputs['inputs'])
    encoder_inputs, _ = model.pre_transformer(feats, inputs['data_samples'])
    return encoder_inputs


def _routed(model, forward, **inputs):
    from himoe_plugin.mmdet.detr_layers import TokenRouting

    routings = []
    mask = inputs.pop('mask')
    tokens = TokenRouting.of_tokens(mask, route_uncounted=inputs.pop('route_uncounted'),
                                    routings=routings)
    out = forward(**inputs, moe_tokens=tokens)
    return out, routings


def test_padding_never_enters_scene_pooling_routing_or_statistics(himoe_dino):
    model, cfg = himoe_dino
    model.train()
    encoder_inputs = _encoder_inputs(model, cfg)
    padding = encoder_inputs['feat_mask']
    assert padding.any() and not padding.all(dim=1).any(), 'the batch must be padded'
    real_tokens = (~padding).sum(dim=1)

    def run(feat):
        torch.manual_seed(0)
        inputs = dict(encoder_inputs, feat=feat)
        return _routed(model, model.forward_encoder, mask=~padding, route_uncounted=False,
                       **inputs)

    out, routings = run(encoder_inputs['feat'])
    garbage = encoder_inputs['feat'].masked_fill(padding.unsqueeze(-1), 1e4)
    out_garbage, routings_garbage = run(garbage)
    assert len(routings) == 3  # the three encoder layers
    for clean, dirty in zip(routings, routings_garbage):
        # Only real tokens are routed; padding changes neither the scene nor the routing.
        assert clean.expert_index.shape[0] == int(real_tokens.sum())
        torch.testing.assert_close(clean.scene.logits, dirty.scene.logits)
        assert torch.equal(clean.expert_index, dirty.expert_index)
        for name in clean.losses:
            torch.testing.assert_close(clean.losses[name], dirty.losses[name])
        for name in clean.statistics:
            torch.testing.assert_close(clean.statistics[name], dirty.statistics[name])
        assert clean.statistics['instances_per_image'] == real_tokens.float().mean()
    real = ~padding
    torch.testing.assert_close(out['memory'][real], out_garbage['memory'][real])


def test_dn_queries_are_routed_but_never_enter_scene_pooling_or_statistics(himoe_dino):
    model, cfg = himoe_dino
    model.train()
    inputs = real_batch(model, cfg)
    samples = inputs['data_samples']
    feats = model.extract_feat(inputs['inputs'])
    encoder_inputs, decoder_inputs = model.pre_transformer(feats, samples)
    encoder_out, _ = _routed(model, model.forward_encoder, mask=~encoder_inputs['feat_mask'],
                             route_uncounted=False, **encoder_inputs)
    torch.manual_seed(1)
    decoder_extra, head_inputs = model.pre_decoder(**encoder_out, batch_data_samples=samples)
    decoder_inputs.update(decoder_extra)
    num_dn = head_inputs['dn_meta']['num_denoising_queries']
    query = decoder_inputs.pop('query')
    assert num_dn > 0 and query.shape[1] == num_dn + model.num_queries
    matching = torch.ones(query.shape[:2], dtype=torch.bool)
    matching[:, :num_dn] = False

    def run(q):
        return _routed(model, model.forward_decoder, mask=matching, route_uncounted=True,
                       query=q, **decoder_inputs)

    out, routings = run(query)
    other_dn = query.clone()
    other_dn[:, :num_dn] = torch.randn_like(other_dn[:, :num_dn]) * 3
    out_other, routings_other = run(other_dn)
    assert len(routings) == 3
    for clean, dirty in zip(routings, routings_other):
        # DN queries are routed (all queries have experts) ...
        assert clean.expert_index.shape[0] == query.shape[0] * query.shape[1]
        # ... but the scene, the losses and the statistics see the matching queries only.
        torch.testing.assert_close(clean.scene.logits, dirty.scene.logits)
        for name in clean.losses:
            torch.testing.assert_close(clean.losses[name], dirty.losses[name])
        for name in clean.statistics:
            torch.testing.assert_close(clean.statistics[name], dirty.statistics[name])
        assert clean.statistics['instances_per_image'].item() == model.num_queries
    states = out['hidden_states']
    assert not torch.allclose(states[:, :, :num_dn], out_other['hidden_states'][:, :, :num_dn])
    torch.testing.assert_close(states[:, :, num_dn:], out_other['hidden_states'][:, :, num_dn:])
    # The experts learn denoising: a loss on the DN outputs alone reaches them.
    model.zero_grad()
    states[-1, :, :num_dn].square().sum().backward()
    last = model.decoder.layers[-1].ffn
    assert last.moe_block.moe.experts.weights[0].grad.abs().sum() > 0


def test_training_loss_has_routing_losses_with_gradients_and_statistics(himoe_dino):
    from mmengine.logging import MessageHub

    model, cfg = himoe_dino
    model.train()
    inputs = real_batch(model, cfg)
    hub = MessageHub.get_instance('test_detr_losses')
    hub.update_info('iter', model.moe_stats_period - 1)  # the step that writes statistics
    losses = model.loss(inputs['inputs'], inputs['data_samples'])
    for name in ROUTING_LOSSES:
        assert losses[name].requires_grad and torch.isfinite(losses[name]), name
    model.zero_grad()
    losses['loss_moe_balance'].backward()
    for ffn in model.moe_ffns:
        assert ffn.moe_block.router.instance_router.weight.grad.abs().sum() > 0, ffn.stats_scope
    scalars = hub.log_scalars
    assert 'train/himoe/encoder.0/expert_load/0' in scalars
    assert 'train/himoe/decoder.2/routing_entropy' in scalars
    assert scalars['train/himoe/decoder.0/instances_per_image'].current() == model.num_queries


def test_a_prediction_writes_nothing_on_any_module(himoe_dino):
    """The token contexts of a pass live in locals (``TokenRouting``), and the stock layer and
    detector code runs on per-call views: after a prediction with routing output, every
    module's attributes are the very objects they were before, so nothing of the batch is held."""
    model, cfg = himoe_dino
    model.eval()

    def attributes():
        return {(name, key): value for name, module in model.named_modules()
                for key, value in vars(module).items()
                if key not in ('_parameters', '_buffers', '_modules')}

    inputs = real_batch(model, cfg, training=False)
    previous = model.test_cfg.get('output_routing', False)
    model.test_cfg['output_routing'] = True
    try:
        before = attributes()
        with torch.no_grad():
            samples = model.predict(inputs['inputs'], inputs['data_samples'])
        after = attributes()
    finally:
        model.test_cfg['output_routing'] = previous
    assert all(len(s.pred_instances.experts) == len(s.pred_instances) for s in samples)
    assert after.keys() == before.keys()
    assert [key for key in before if after[key] is not before[key]] == []


# ---------------------------------------------------------------- upcycling

def _dense_and_moe(options):
    dense, cfg = build(DENSE_DINO_CPU)
    moe, _ = build(HIMOE_DINO_CPU, options)
    result = moe.load_state_dict(copy.deepcopy(dense.state_dict()), strict=False)
    assert not result.unexpected_keys  # every dense FFN key became experts
    assert result.missing_keys and all('.ffn.moe_block.router.' in k for k in result.missing_keys)
    return dense.eval(), moe.eval(), cfg


def _predict(model, inputs):
    with torch.no_grad():
        torch.manual_seed(0)
        return model._forward(inputs['inputs'], inputs['data_samples'])


@pytest.mark.parametrize('options', [
    {},  # copy, k=2 of 8 in 2 of 4 groups, shared expert
    {'model.moe.router.top_k': 1, 'model.moe.shared_expert': False},
    {'model.moe.upcycle': dict(mode='copy', noise_std=0.0), 'model.moe.router.num_experts': 4,
     'model.moe.router.num_groups': 2, 'model.moe.router.scene_top_k': 1},
])
def test_copy_upcycled_dino_equals_the_dense_dino(options):
    dense, moe, cfg = _dense_and_moe(options)
    ffn = moe.encoder.layers[0].ffn
    assert ffn.upcycle_report and 'layers.0.0.weight' in ffn.upcycle_report[0]
    inputs = real_batch(dense, cfg, training=False)
    for got, expected in zip(_predict(moe, inputs), _predict(dense, inputs)):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_split_upcycled_dino_with_every_expert_on_equals_the_dense_dino():
    """Split mode: each expert holds 1024 / 8 = 128 hidden units of the dense FFN. With every
    expert on and uniform routing weights, the experts together are exactly the dense FFN."""
    options = {'model.moe.upcycle': dict(mode='split'), 'model.moe.shared_expert': False,
               'model.moe.router.num_groups': 1, 'model.moe.router.scene_top_k': 1,
               'model.moe.router.top_k': 8}
    dense, moe, cfg = _dense_and_moe(options)
    for ffn in moe.moe_ffns:
        assert ffn.moe_block.moe.dims == (256, 128, 256)
        for linear in (ffn.moe_block.router.instance_router, ffn.moe_block.router.scene_router):
            torch.nn.init.zeros_(linear.weight)  # uniform routing over all 8 experts
    inputs = real_batch(dense, cfg, training=False)
    for got, expected in zip(_predict(moe, inputs), _predict(dense, inputs)):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_checkpoint_with_another_expert_or_group_count_fails_naming_the_key():
    moe, _ = build(HIMOE_DINO_CPU)
    fewer_experts, _ = build(HIMOE_DINO_CPU, {'model.moe.router.num_experts': 4})
    with pytest.raises(ValueError, match=r'moe\.router\.num_experts: the checkpoint has 8 experts'):
        fewer_experts.load_state_dict(moe.state_dict())
    fewer_groups, _ = build(HIMOE_DINO_CPU, {'model.moe.router.num_groups': 2,
                                             'model.moe.router.scene_top_k': 1})
    with pytest.raises(MoEConfigError, match=r"^moe\.router\.num_groups=2: the checkpoint's router "
                                             r"at 'encoder\.layers\.0\.ffn\.moe_block\.router' chooses among 4"):
        fewer_groups.load_state_dict(moe.state_dict())


@pytest.mark.parametrize('stock, moe_type', [
    ('mmdet::deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
     'HIMoEDeformableDETR'),
    ('mmdet::detr/detr_r18_8xb2-500e_coco.py', 'HIMoEDETR'),
])
def test_deformable_detr_and_detr_train_and_upcycle_exactly(tmp_path, stock, moe_type):
    """The other DETR-family detectors: the stock config plus `type` and `moe` trains with
    routing losses, and copy-upcycled from the dense model predicts exactly what it predicts."""
    small = {'model.backbone.init_cfg': None, 'model.encoder.num_layers': 2,
             'model.decoder.num_layers': 2, 'model.num_queries': 30}
    dense_cfg = tmp_path / 'dense.py'
    dense_cfg.write_text(f'_base_ = {stock!r}\n')
    moe_cfg = write_config(tmp_path / 'moe.py', dense_cfg, f"""
custom_imports = dict(imports=['himoe_plugin.mmdet'], allow_failed_imports=False)
model = dict(type={moe_type!r}, moe=dict(
    router=dict(num_experts=4, top_k=2, num_groups=2, scene_top_k=1), shared_expert=True))
""")
    dense, _ = build(dense_cfg, small)
    moe, _ = build(moe_cfg, small)
    assert len(moe.moe_ffns) == 4
    _, aquarium_cfg = build(DENSE_DINO_CPU, {'model.encoder.num_layers': 1,
                                             'model.decoder.num_layers': 1})
    inputs = real_batch(moe, aquarium_cfg)
    moe.train()
    losses = moe.loss(inputs['inputs'], inputs['data_samples'])
    assert all(losses[name].requires_grad for name in ('loss_moe_balance', 'loss_moe_z'))
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    assert all(ffn.moe_block.router.instance_router.weight.grad.abs().sum() > 0
               for ffn in moe.moe_ffns)

    moe.load_state_dict(dense.state_dict(), strict=False)
    test_inputs = real_batch(dense, aquarium_cfg, training=False)
    for got, expected in zip(_predict(moe.eval(), test_inputs), _predict(dense.eval(), test_inputs)):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- stock tools

@pytest.mark.slow
def test_stock_train_and_test_tools_train_and_evaluate_himoe_dino(tmp_path, data_root, valid_slice):
    """mmdet's own tools/train.py and tools/test.py (through tools/mmdet/run_tool.py) train the
    CPU-sized HI-MoE DINO for 2 iterations and evaluate it with CocoMetric."""
    predictions = tmp_path / 'val.pkl'
    config = write_config(tmp_path / 'dino_cfg.py', HIMOE_DINO_CPU, f"""
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
model = dict(moe=dict(stats_period=1))
{slice_eval_config(valid_slice, predictions)}
""")
    work_dir = tmp_path / 'work_dir'
    env = subprocess_env(data_root)
    train = subprocess.run(
        [sys.executable, 'tools/mmdet/run_tool.py', 'train.py', str(config),
         '--work-dir', str(work_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
    scalars = [json.loads(line) for line in
               next(work_dir.glob('*/vis_data/scalars.json')).read_text().splitlines()]
    steps = [s for s in scalars if 'loss' in s]
    assert [s['step'] for s in steps] == [1, 2]
    for step in steps:
        for name in ROUTING_LOSSES:
            assert step[name] > 0, name
        load = [step[f'himoe/encoder.1/expert_load/{e}'] for e in range(8)]
        assert abs(sum(load) - 1) < 1e-5
    assert any('coco/bbox_mAP' in s for s in scalars)
    test = subprocess.run(
        [sys.executable, 'tools/mmdet/run_tool.py', 'test.py', str(config),
         str(work_dir / 'iter_2.pth'), '--work-dir', str(tmp_path / 'test_dir')],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert test.returncode == 0, (test.stdout + test.stderr)[-4000:]
    assert 'coco/bbox_mAP:' in test.stdout + test.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_share_global_routing_losses(tmp_path, data_root, valid_slice):
    """tools/mmdet/dist_train.sh on 2 gloo processes (no find_unused_parameters): HI-MoE DINO
    trains 2 iterations; the routing losses and statistics of every MoE layer are global
    (identical on both ranks) while the detection losses of their different images differ."""
    probe_dir = tmp_path / 'probe'
    config = write_config(tmp_path / 'ddp_cfg.py', HIMOE_DINO_CPU, f"""
custom_imports = dict(imports=['himoe_plugin.mmdet', 'mmdet_probes'], allow_failed_imports=False)
custom_hooks = [dict(type='RankScalarsProbe', out_dir={str(probe_dir)!r})]
train_cfg = dict(max_iters=2, val_interval=100)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=100))
model = dict(moe=dict(stats_period=1))
{slice_eval_config(valid_slice, tmp_path / 'unused.pkl')}
""")
    ranks = dist_train_two_ranks(config, tmp_path / 'work_dir', probe_dir, data_root)
    assert sorted(ranks[0]) == sorted(ranks[1]) == ['1', '2']
    for step in ('1', '2'):
        rank0, rank1 = ranks[0][step], ranks[1][step]
        global_names = [k for k in rank0 if k.startswith(('loss_moe_', 'himoe/'))]
        assert set(ROUTING_LOSSES) <= set(global_names)
        assert {k.split('/')[1] for k in global_names if k.startswith('himoe/')} == {
            f'{part}.{i}' for part in ('encoder', 'decoder') for i in range(3)}
        for name in global_names:
            assert rank0[name] == rank1[name], (step, name)
        assert rank0['loss_cls'] != rank1['loss_cls']
