"""Routing analysis, routing in predictions, statistics at the logger interval, weights-only
checkpoints with mmdet's own publish_model.py / test.py, get_flops, on MMDetection checkpoints
trained by the tests (Aquarium)."""
import csv
import json
import pickle
import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch
from mmdet.registry import LOG_PROCESSORS, MODELS
from .mmdet_helpers import (CONFIG_DIR, DENSE_CONFIG, HIMOE_CONFIG, REPO_ROOT, mmdet_tools_dir, subprocess_env,
                           write_config)
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.registry import init_default_scope
from mmengine.runner import Runner, load_checkpoint

import himoe_plugin.mmdet  # noqa: F401  (registers the modules)
from himoe_plugin.mmdet import WeightsOnlyCheckpointHook
from himoe_plugin.mmdet.analysis import routed_images

NUM_EXPERTS, EXPERTS_PER_GROUP = 6, 2  # the Aquarium HI-MoE config: 6 experts in 3 groups
CASCADE_CONFIG = CONFIG_DIR / 'himoe-cascade-rcnn_r18_fpn_aquarium_cpu.py'
DINO_CONFIG = CONFIG_DIR / 'himoe-dino-4scale_r18_aquarium_cpu.py'
DENSE_DINO_CONFIG = CONFIG_DIR / 'dino-4scale_r18_aquarium_cpu.py'


def tool(name: str):
    return runpy.run_path(str(REPO_ROOT / 'tools' / f'{name}.py'))['main']


def random_init_checkpoint(config: Path, path: Path) -> Path:
    """A checkpoint of ``config``'s model at its seeded random init, with the dataset's classes
    in its meta (as a trained one has them)."""
    init_default_scope('mmdet')
    cfg = Config.fromfile(str(config))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    classes = cfg.test_dataloader.dataset.metainfo['classes']
    torch.save({'meta': {'dataset_meta': {'classes': classes}}, 'state_dict': model.state_dict()}, path)
    return path


def trained_model(config, checkpoint):
    init_default_scope('mmdet')
    cfg = Config.fromfile(str(config))
    model = MODELS.build(cfg.model)
    load_checkpoint(model, str(checkpoint), map_location='cpu')
    return model.eval(), cfg


def wait_for_published(folder: Path, stem: str) -> Path:
    """The file publish_model.py renamed to ``<stem>-<sha256[:8]>.pth`` in a background ``mv``."""
    for _ in range(100):
        found = list(folder.glob(f'{stem}-*.pth'))
        if found and not (folder / f'{stem}.pth').exists():
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f'no {stem}-<sha>.pth in {folder}')


@pytest.mark.slow
def test_routing_in_predictions_is_opt_in_and_leaves_the_predictions_unchanged(trained_run):
    model, cfg = trained_model(trained_run.config, trained_run.checkpoint)
    cfg.test_dataloader.update(batch_size=2, num_workers=0)
    batch = next(iter(Runner.build_dataloader(cfg.test_dataloader)))
    assert not model.roi_head.test_cfg.get('output_routing', False)
    with torch.no_grad():
        stock = [s.pred_instances for s in model.test_step(batch)]
    routed = list(routed_images(model, [batch]))  # test_cfg.rcnn.output_routing on, then off
    assert not model.roi_head.test_cfg['output_routing']
    assert len(routed) == 2
    for expected, (sample, layers) in zip(stock, routed):
        pred = sample.pred_instances
        assert set(expected.keys()) == {'bboxes', 'scores', 'labels'}
        assert set(pred.keys()) == {'bboxes', 'scores', 'labels', 'experts', 'expert_weights'}
        assert len(pred) == len(expected) > 0
        torch.testing.assert_close(pred.bboxes, expected.bboxes)
        assert torch.equal(pred.labels, expected.labels)
        assert pred.experts.shape == pred.expert_weights.shape == (len(pred), 2)
        kept_groups = set(layers[0].scene_groups.tolist())
        assert all(e // EXPERTS_PER_GROUP in kept_groups for e in pred.experts.flatten().tolist())
        assert (pred.expert_weights[:, 0] >= pred.expert_weights[:, 1]).all()
        torch.testing.assert_close(pred.expert_weights.sum(dim=1), torch.ones(len(pred)))
        roi_routings = {tuple(row) for row in layers[0].expert_index.tolist()}
        assert {tuple(row) for row in pred.experts.tolist()} <= roi_routings


@pytest.mark.slow
def test_analyze_routing_tool_writes_table_metrics_and_readable_figures(trained_run, tmp_path, capsys):
    out = tmp_path / 'routing'
    main = runpy.run_path(str(REPO_ROOT / 'tools' / 'analyze_routing.py'))['main']
    paths = main(['mmdet', str(trained_run.config), str(trained_run.checkpoint), '--output-dir', str(out),
                  '--vis-images', '2', '--cfg-options', 'model.test_cfg.rcnn.max_per_img=30'])
    printed = capsys.readouterr().out
    assert 'routing analysis of 8 images' in printed and 'I(size; expert) = ' in printed
    summary = json.loads(paths['summary'].read_text())
    layer = summary['layers']['roi_head.bbox_head']
    with open(paths['table']) as f:
        rows = list(csv.DictReader(f))
    assert summary['images'] == 8 and len(rows) == layer['instances'] == 8 * 300  # test rpn max_per_img
    assert {r['level'] for r in rows} <= {'P2', 'P3', 'P4', 'P5'}
    assert {r['gt_class'] for r in rows} <= {*summary['classes'], 'background'}
    assert summary['layers']['roi_head.bbox_head']['num_experts'] == NUM_EXPERTS
    assert set(layer['scene_group_usage']) <= {'all images', 'bird', 'fish-like', 'invertebrate'}
    assert sum(layer['scene_group_usage']['all images']['group_usage']) == 2.0  # 2 of 3 groups kept
    for kind in ('class_expert', 'size_expert', 'level_expert', 'scene_groups'):
        image = matplotlib.image.imread(paths[f'roi_head.bbox_head_{kind}'])
        assert image.shape[0] >= 250 and image.shape[1] >= 500, kind
    assert len(list((out / 'examples').glob('*.png'))) == 2


@pytest.mark.slow
def test_statistics_follow_the_logger_interval_given_at_run_time(tmp_path, himoe_data_root):
    """The config leaves the RoI head's stats_period at its default (50); the logger interval
    is set on the command line style (merged cfg) to 2: statistics are logged at step 2."""
    config = write_config(tmp_path / 'cfg.py', HIMOE_CONFIG, """
train_cfg = dict(max_iters=2, val_interval=100)
default_hooks = dict(checkpoint=dict(interval=100))
""")
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict({'default_hooks.logger.interval': 2})
    cfg.update(val_cfg=None, val_dataloader=None, val_evaluator=None, work_dir=str(tmp_path / 'work_dir'))
    # A visualizer of its own: MMEngine reuses an existing instance of the same name (and its
    # save_dir), which would send another run's scalars.json here, or ours there.
    cfg.visualizer.name = f'himoe_statistics_{tmp_path.name}'

    assert cfg.model.roi_head.get('stats_period') is None
    runner = Runner.from_cfg(cfg)
    runner.train()
    hub = runner.message_hub
    loads = [hub.get_scalar(f'train/himoe/expert_load/{e}') for e in range(NUM_EXPERTS)]
    assert all(len(buffer.data[0]) == 1 for buffer in loads)  # written once: at step 2
    latest = [buffer.current() for buffer in loads]
    assert abs(sum(latest) - 1.0) < 1e-5
    assert hub.get_scalar('train/himoe/load_max').current() == max(latest)
    assert hub.get_scalar('train/himoe/load_min').current() == min(latest)
    log = next(Path(runner.log_dir).glob('*.log')).read_text()
    lines = log.splitlines()
    index = next(i for i, line in enumerate(lines) if 'Iter(train) [2/2]' in line)
    assert 'loss_cls: ' in lines[index] and 'himoe/' not in lines[index]  # the losses stay readable
    assert lines[index + 1].startswith(f'himoe: load max {max(latest):.3f} min {min(latest):.3f}  routing_entropy ')
    assert 'Iter(train) [1/2]' not in log
    # The means cover both iterations: the meters were read once, by the hook.
    assert all(m.statistics.steps == 0 for m in runner.model.modules() if hasattr(m, 'statistics'))


@pytest.mark.slow
def test_checkpoints_load_weights_only_without_the_plugin_and_resume_their_buffers(trained_run):
    probe = ('import sys, torch; c = torch.load(sys.argv[1], map_location="cpu"); '
             'print(sorted(c), "himoe_plugin" in sys.modules)')
    result = subprocess.run([sys.executable, '-c', probe, str(trained_run.checkpoint)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split('] ')[-1].strip() == 'False'
    checkpoint = torch.load(trained_run.checkpoint, map_location='cpu')
    WeightsOnlyCheckpointHook().after_load_checkpoint(None, checkpoint)
    losses = checkpoint['message_hub']['log_scalars']['train/loss']
    assert isinstance(losses, HistoryBuffer)
    history = losses.data[0]
    logged = [s['loss'] for s in trained_run.scalars if 'loss' in s]  # window means (window 10)
    assert history.dtype == np.float64 and len(history) == len(logged) >= 3
    for step, value in enumerate(logged, start=1):
        assert abs(value - history[:step].mean()) < 1e-4 * max(1.0, value)


@pytest.mark.slow
def test_stock_publish_model_and_test_tool_on_the_published_checkpoint(trained_run, tmp_path, data_root):
    """mmdet's own publish_model.py, run as it is (the plugin is not imported), then mmdet's
    test.py on the published file: the same predictions as validation during training."""
    env = subprocess_env(data_root)
    out = tmp_path / 'himoe_aquarium.pth'
    result = subprocess.run(
        [sys.executable, str(mmdet_tools_dir() / 'model_converters' / 'publish_model.py'),
         str(trained_run.checkpoint), str(out)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    published = wait_for_published(tmp_path, 'himoe_aquarium')
    assert sorted(torch.load(published, map_location='cpu')) == ['meta', 'state_dict']
    predictions = tmp_path / 'predictions.pkl'
    result = subprocess.run(
        [sys.executable, str(mmdet_tools_dir() / 'test.py'), str(trained_run.config), str(published),
         '--work-dir', str(tmp_path / 'work_dir'), '--out', str(predictions)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(predictions, 'rb') as f:
        tested = pickle.load(f)
    with open(trained_run.val_predictions, 'rb') as f:
        validated = pickle.load(f)
    for t, v in zip(tested, validated):
        torch.testing.assert_close(t['pred_instances']['bboxes'], v['pred_instances']['bboxes'])
        assert torch.equal(t['pred_instances']['labels'], v['pred_instances']['labels'])


@pytest.mark.slow
def test_published_dense_checkpoint_upcycles_into_the_himoe_model(tmp_path, data_root):
    init_default_scope('mmdet')
    torch.manual_seed(0)
    dense = MODELS.build(Config.fromfile(str(DENSE_CONFIG)).model)
    torch.save({'meta': {'iter': 9}, 'state_dict': dense.state_dict(), 'optimizer': {'state': {}}},
               tmp_path / 'dense.pth')
    result = subprocess.run(
        [sys.executable, str(mmdet_tools_dir() / 'model_converters' / 'publish_model.py'),
         str(tmp_path / 'dense.pth'), str(tmp_path / 'dense_aquarium.pth')],
        cwd=tmp_path, env=subprocess_env(data_root), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    published = wait_for_published(tmp_path, 'dense_aquarium')
    himoe, _ = trained_model(HIMOE_CONFIG, published)
    head = himoe.roi_head.bbox_head
    assert head.upcycle_report
    fc0 = dense.roi_head.bbox_head.shared_fcs[0].weight
    assert all(torch.equal(expert, fc0) for expert in head.moe_block.moe.experts.weights[0])


@pytest.mark.slow
def test_get_flops_counts_the_routers_and_reports_active_parameters(data_root):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'tools' / 'mmdet' / 'run_tool.py'), 'analysis_tools/get_flops.py',
         str(HIMOE_CONFIG), '--num-images', '1'],
        cwd=REPO_ROOT, env=subprocess_env(data_root), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert 'Flops: ' in output and 'Params: ' in output
    never_called = [line for line in output.splitlines() if 'roi_head.bbox_head.loss_cls' in line]
    assert never_called and all('moe_block.router' not in line for line in never_called)
    init_default_scope('mmdet')
    model = MODELS.build(Config.fromfile(str(HIMOE_CONFIG)).model)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.roi_head.bbox_head.moe_block.moe.experts.parameters()) // NUM_EXPERTS
    active = total - (NUM_EXPERTS - 2) * expert
    assert f'HI-MoE parameters: total {total / 1e6:.2f}M, active per instance {active / 1e6:.2f}M' in output


def test_detr_predictions_carry_the_routing_of_their_query():
    """HI-MoE DINO with test_cfg.output_routing: each prediction's experts are those its query got
    in the last MoE decoder layer; the query is the one whose score the prediction has."""
    init_default_scope('mmdet')
    cfg = Config.fromfile(str(CONFIG_DIR / 'himoe-dino-4scale_r18_aquarium_cpu.py'))
    cfg.merge_from_dict({'model.test_cfg.output_routing': True, 'model.test_cfg.max_per_img': 20})
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.eval()
    from mmdet.registry import DATASETS

    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    data = model.data_preprocessor(pseudo_collate([dataset[0], dataset[1]]), False)
    routings = []
    with torch.no_grad():
        samples = model.predict(data['inputs'], data['data_samples'])
        head_inputs, routings = model.forward_transformer(model.extract_feat(data['inputs']),
                                                          data['data_samples'])
        cls_scores = model.bbox_head(**head_inputs)[0][-1].sigmoid()  # (B, Q, C)
    last = routings[-1]
    num_queries = cls_scores.shape[1]
    for image, sample in enumerate(samples):
        pred = sample.pred_instances
        assert pred.experts.shape == pred.expert_weights.shape == (20, 2)
        # Find each prediction's query from its score and label, independently of the model code.
        for label, score, experts, weights in zip(pred.labels, pred.scores, pred.experts, pred.expert_weights):
            query = int((cls_scores[image, :, label] - score).abs().argmin())
            assert abs(float(cls_scores[image, query, label]) - float(score)) < 1e-6
            row = image * num_queries + query
            assert torch.equal(experts, last.expert_index[row])
            torch.testing.assert_close(weights, last.combine_weight[row])
    cfg.merge_from_dict({'model.test_cfg.output_routing': False})
    model.test_cfg['output_routing'] = False
    with torch.no_grad():
        assert 'experts' not in model.predict(data['inputs'], data['data_samples'])[0].pred_instances


def test_detr_routing_analysis_follows_the_queries_of_the_predictions(himoe_data_root):
    """DETR family: the analysed instances are the predictions, with their query's routing in the
    last MoE decoder layer (no FPN level) and the image's scene groups of that layer."""
    from himoe_plugin.mmdet.analysis import dataset_truths, new_analysis

    init_default_scope('mmdet')
    cfg = Config.fromfile(str(CONFIG_DIR / 'himoe-dino-4scale_r18_aquarium_cpu.py'))
    cfg.merge_from_dict({'model.test_cfg.max_per_img': 10, 'model.moe.decoder_layers': [0, 1]})
    cfg.test_dataloader.update(batch_size=2, num_workers=0)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    loader = Runner.build_dataloader(cfg.test_dataloader)
    analysis = new_analysis(model, loader.dataset)
    assert list(analysis.layers) == ['decoder.1']
    truths = dataset_truths(loader.dataset)
    for sample, routed in routed_images(model, loader, max_images=2):
        (layer,) = routed
        assert layer.layer == 'decoder.1' and layer.levels is None
        assert torch.equal(layer.expert_index, sample.pred_instances.experts)
        assert torch.equal(layer.boxes, sample.pred_instances.bboxes)
        assert len(layer.scene_groups) == 2  # scene_top_k of the config
        analysis.add_image(truths[sample.img_id], routed)
    assert model.test_cfg['output_routing'] is False
    summary = analysis.summary()['layers']['decoder.1']
    assert summary['instances'] == 20 and summary['level_expert']['rows'] == []


@pytest.mark.slow
def test_demo_command_draws_routed_predictions_with_det_inferencer(trained_run, data_root, tmp_path):
    image = sorted((data_root / 'aquarium/images/valid').glob('*.jpg'))[0]
    main = runpy.run_path(str(REPO_ROOT / 'tools' / 'demo_routing.py'))['main']
    (written,) = main(['mmdet', str(trained_run.config), str(trained_run.checkpoint), '--input', str(image),
                       '--output-dir', str(tmp_path), '--score-thresh', '0', '--device', 'cpu'])
    drawn, original = matplotlib.image.imread(written), matplotlib.image.imread(image)
    assert drawn.shape[:2] == original.shape[:2]
    assert abs(drawn[..., :3].astype(float) * 255 - original[..., :3].astype(float)).mean() > 0.5


def test_analyze_routing_refuses_dense_models_before_loading_weights(tmp_path):
    """Before: AttributeError / StopIteration, or with --vis-images 0 an empty analysis (exit 0)."""
    never_read = tmp_path / 'never_read.pth'  # loading it would fail differently
    for config in (DENSE_CONFIG, DENSE_DINO_CONFIG):
        with pytest.raises(SystemExit) as exit_info:
            tool('analyze_routing')(['mmdet', str(config), str(never_read), '--output-dir', str(tmp_path / 'out'),
                                     '--vis-images', '0'])
        assert f'{config} builds a dense' in str(exit_info.value.code)
        assert 'without HI-MoE layers' in str(exit_info.value.code)
        with pytest.raises(SystemExit) as exit_info:
            tool('demo_routing')(['mmdet', str(config), str(never_read), '--input', 'unused.jpg', '--output-dir',
                                  str(tmp_path / 'demo'), '--device', 'cpu'])
        assert 'without HI-MoE layers' in str(exit_info.value.code)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_analyze_routing_on_a_cascade_records_the_rois_of_every_stage(tmp_path):
    """Every stage routes the boxes it pools (stage 0 the proposals, later stages refined boxes)
    with its own experts inside the image's scene subset; the predictions of the last stage carry
    the routing the example image draws."""
    checkpoint = random_init_checkpoint(CASCADE_CONFIG, tmp_path / 'cascade_init.pth')
    out = tmp_path / 'routing'
    paths = tool('analyze_routing')(['mmdet', str(CASCADE_CONFIG), str(checkpoint), '--output-dir', str(out),
                                     '--max-images', '2', '--vis-images', '1',
                                     '--cfg-options', 'model.test_cfg.rpn.max_per_img=40'])
    summary = json.loads(paths['summary'].read_text())
    assert summary['images'] == 2 and len(summary['layers']) == 3
    with open(paths['table']) as f:
        rows = list(csv.DictReader(f))
    boxes = []
    for stage in sorted(summary['layers']):
        stage_rows = [r for r in rows if r['layer'] == stage]
        assert summary['layers'][stage]['instances'] == len(stage_rows) == 2 * 40
        for row in stage_rows:
            kept = {int(g) for g in row['scene_groups'].split()}
            assert len(kept) == 2 and {int(row['expert_0']) // EXPERTS_PER_GROUP,
                                       int(row['expert_1']) // EXPERTS_PER_GROUP} <= kept
        boxes.append(torch.tensor([[float(r[k]) for k in ('x1', 'y1', 'x2', 'y2')] for r in stage_rows]))
    assert not torch.allclose(boxes[0], boxes[1])
    assert len(list((out / 'examples').glob('*.png'))) == 1


@pytest.mark.slow
def test_analyze_routing_on_a_dino_checkpoint_follows_the_queries(tmp_path, capsys):
    checkpoint = random_init_checkpoint(DINO_CONFIG, tmp_path / 'dino_init.pth')
    out = tmp_path / 'routing'
    paths = tool('analyze_routing')(['mmdet', str(DINO_CONFIG), str(checkpoint), '--output-dir', str(out),
                                     '--max-images', '2', '--vis-images', '1',
                                     '--cfg-options', 'model.test_cfg.max_per_img=10'])
    summary = json.loads(paths['summary'].read_text())
    assert list(summary['layers']) == ['decoder.2']  # the last MoE decoder layer (3 decoder layers)
    layer = summary['layers']['decoder.2']
    assert summary['images'] == 2 and layer['instances'] == 20 and layer['num_experts'] == 8
    assert layer['level_expert']['rows'] == []  # queries have no FPN level
    assert sum(layer['expert_instances']) == 20 * 2  # top-2 per query, no capacity limit
    assert len(list((out / 'examples').glob('*.png'))) == 1
    printed = capsys.readouterr().out
    assert 'routing analysis of 2 images' in printed and '[decoder.2] 20 instances, 8 experts' in printed


@pytest.mark.slow
def test_demo_says_when_no_prediction_passes_the_threshold(tmp_path, data_root, capsys):
    """Before: a plain photo and no message."""
    checkpoint = random_init_checkpoint(HIMOE_CONFIG, tmp_path / 'himoe_init.pth')
    image = sorted((data_root / 'aquarium/images/valid').glob('*.jpg'))[0]
    (written,) = tool('demo_routing')(['mmdet', str(HIMOE_CONFIG), str(checkpoint), '--input', str(image),
                                       '--output-dir', str(tmp_path / 'demo'), '--score-thresh', '1.01',
                                       '--device', 'cpu'])
    assert f'{written}: no prediction with score >= 1.01' in capsys.readouterr().out
    drawn = matplotlib.image.imread(written)[..., :3]
    assert drawn.shape[:2] == matplotlib.image.imread(image).shape[:2]
    assert drawn[-3:].max() <= 40 / 255  # the note's band at the bottom


def test_log_processor_shows_one_compact_routing_line_and_keeps_every_value_for_the_visualizer():
    """Before: a DINO's line held ~130 himoe/encoder.i/... values (~5,000 characters) inline."""
    hub = MessageHub(name='himoe_log_processor_test')
    hub.update_scalar('train/loss', 1.25)
    hub.update_scalar('train/loss_cls', 0.75)
    layers = [f'encoder.{i}' for i in range(6)] + [f'decoder.{i}' for i in range(6)]
    for i, layer in enumerate(layers):
        for e in range(8):
            hub.update_scalar(f'train/himoe/{layer}/expert_load/{e}', 0.125)
        hub.update_scalar(f'train/himoe/{layer}/load_max', 0.2 + i / 100)
        hub.update_scalar(f'train/himoe/{layer}/load_min', 0.1 - i / 200)
        hub.update_scalar(f'train/himoe/{layer}/routing_entropy', 1.0 + i / 10)
        hub.update_scalar(f'train/himoe/{layer}/dropped_fraction', 0.0)
    runner = SimpleNamespace(message_hub=hub, iter=9, max_iters=100, _train_loop=SimpleNamespace())
    processor = LOG_PROCESSORS.build(dict(type='HIMoELogProcessor', by_epoch=False, window_size=1))
    tag, log_str = processor.get_log_after_iter(runner, 9, 'train')
    assert sum(name.startswith('himoe/') for name in tag) == 12 * 12  # all of them go to the visualizer
    losses, summary = log_str.splitlines()
    assert 'Iter(train) [ 10/100]' in losses and 'loss: 1.2500' in losses and 'loss_cls: 0.7500' in losses
    assert 'himoe/' not in losses
    assert summary == ('himoe (12 layers): load max 0.310 (decoder.5) min 0.045 (decoder.5)  '
                       'routing_entropy 1.000 (encoder.0) .. 2.100 (decoder.5)  dropped_fraction max 0.000 (encoder.0)')
    assert len(summary) < 200
