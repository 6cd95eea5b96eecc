"""Paths and helpers shared by the MMDetection adapter tests."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
from mmdet.registry import DATASETS, MODELS
from mmengine.config import Config
from mmengine.dataset import pseudo_collate

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / 'configs' / 'mmdet' / 'aquarium'
HIMOE_CONFIG = CONFIG_DIR / 'himoe-faster-rcnn_r18_fpn_aquarium_cpu.py'
DENSE_CONFIG = CONFIG_DIR / 'faster-rcnn_r18_fpn_aquarium_cpu.py'
PROBES_DIR = Path(__file__).resolve().parent  # holds mmdet_probes.py
VALID_IMAGES = 8
TRAIN_ITERS = 3


def mmdet_tools_dir() -> Path:
    import mmdet

    return Path(mmdet.__file__).resolve().parent / '.mim' / 'tools'


def subprocess_env(data_root: Path) -> Dict[str, str]:
    """Environment of tool subprocesses: the test data, the probes, one thread per process."""
    env = dict(os.environ, HIMOE_DATA_ROOT=str(data_root), OMP_NUM_THREADS='1',
               PYTHON=sys.executable)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(PROBES_DIR), env.get('PYTHONPATH', '')) if p)
    return env


def write_config(path: Path, base: Path, body: str) -> Path:
    """A config file inheriting ``base`` (absolute path) with ``body`` appended."""
    path.write_text(f'_base_ = {str(base)!r}\n{body}')
    return path


def slice_eval_config(valid_slice: Path, predictions: Path) -> str:
    """Config lines: evaluate on the valid slice, also dumping the predictions."""
    return f"""
val_dataloader = dict(dataset=dict(ann_file={str(valid_slice)!r}))
test_dataloader = val_dataloader
val_evaluator = [
    dict(type='CocoMetric', ann_file={str(valid_slice)!r}, metric='bbox'),
    dict(type='DumpDetResults', out_file_path={str(predictions)!r}),
]
test_evaluator = dict(_delete_=True, type='CocoMetric', ann_file={str(valid_slice)!r},
                      metric='bbox')
"""


def dist_train_two_ranks(config: Path, work_dir: Path, probe_dir: Path, data_root: Path
                         ) -> List[Dict[str, Dict[str, float]]]:
    """Train ``config`` with tools/mmdet/dist_train.sh on 2 gloo processes; returns each rank's
    ``{iter: {scalar: value}}`` written by the config's ``RankScalarsProbe`` to ``probe_dir``."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env = subprocess_env(data_root)
    env['PORT'] = str(port)
    result = subprocess.run(
        ['bash', str(REPO_ROOT / 'tools/mmdet/dist_train.sh'), str(config), '2',
         '--work-dir', str(work_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return [json.loads((probe_dir / f'rank{r}.json').read_text()) for r in (0, 1)]


def without_scope(value):
    """``value`` without the ``_scope_`` keys that ``mmdet::`` inheritance adds."""
    if isinstance(value, dict):
        return {k: without_scope(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(without_scope(v) for v in value)
    return value


def mmdet_stock_config(relative: str):
    """Path of one of mmdet's own configs, e.g. ``faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py``."""
    return mmdet_tools_dir().parent / 'configs' / relative


def without_roi_head(cfg: Config) -> dict:
    settings = without_scope(cfg.to_dict())
    settings['model'].pop('roi_head')
    settings.pop('custom_imports', None)
    settings.pop('custom_hooks', None)  # the plugin's hooks (statistics, weights-only checkpoints)
    if settings.get('log_processor', {}).get('type') == 'HIMoELogProcessor':  # compact console line
        settings['log_processor']['type'] = 'LogProcessor'
    return settings


def load_config(path, options=None) -> Config:
    cfg = Config.fromfile(str(path))
    if options:
        cfg.merge_from_dict(options)
    return cfg


def build_model(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def real_batch(cfg: Config, model, indices, split='train'):
    """Preprocessed ``{'inputs', 'data_samples'}`` of real images."""
    loader = cfg.train_dataloader if split == 'train' else cfg.val_dataloader
    dataset = DATASETS.build(loader.dataset)
    return model.data_preprocessor(pseudo_collate([dataset[i] for i in indices]),
                                   training=split == 'train')
