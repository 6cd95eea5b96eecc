"""Fixtures of the MMDetection adapter tests: the bundled data, one shared trained run."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest
from mmengine.config import Config
from mmengine.runner import Runner
from .mmdet_helpers import HIMOE_CONFIG, TRAIN_ITERS, VALID_IMAGES, slice_eval_config, write_config


@pytest.fixture(scope='session')
def valid_slice(tmp_path_factory, data_root: Path) -> Path:
    """COCO json of the first ``VALID_IMAGES`` Aquarium valid images (annotations only)."""
    coco = json.loads((data_root / 'aquarium/annotations/instances_valid.json').read_text())
    coco['images'] = coco['images'][:VALID_IMAGES]
    kept = {image['id'] for image in coco['images']}
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] in kept]
    path = tmp_path_factory.mktemp('aquarium') / 'instances_valid_slice.json'
    path.write_text(json.dumps(coco))
    return path


@dataclass
class TrainedRun:
    """One short HI-MoE training run with validation, shared by several tests."""

    config: Path
    work_dir: Path
    checkpoint: Path
    val_predictions: Path
    metrics: Dict[str, float]
    log: str
    scalars: List[dict]


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, himoe_data_root, valid_slice: Path) -> TrainedRun:
    """Runner trains HI-MoE R18-FPN ``TRAIN_ITERS`` iterations on Aquarium train, saves a
    checkpoint, then validates with CocoMetric on the valid slice."""
    root = tmp_path_factory.mktemp('trained')
    predictions = root / 'val_predictions.pkl'
    config = write_config(root / 'himoe_cfg.py', HIMOE_CONFIG, f"""
train_cfg = dict(max_iters={TRAIN_ITERS}, val_interval={TRAIN_ITERS})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={TRAIN_ITERS}))
model = dict(roi_head=dict(stats_period=1))
randomness = dict(seed=0)
{slice_eval_config(valid_slice, predictions)}
""")
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(root / 'work_dir')
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = {
        name[len('val/'):]: float(buffer.current())
        for name, buffer in runner.message_hub.log_scalars.items()
        if name.startswith('val/coco/')
    }
    log_file = next(Path(cfg.work_dir).glob('*/*.log'))
    scalars_file = next(Path(cfg.work_dir).glob('*/vis_data/scalars.json'))
    return TrainedRun(
        config=config,
        work_dir=Path(cfg.work_dir),
        checkpoint=Path(cfg.work_dir) / f'iter_{TRAIN_ITERS}.pth',
        val_predictions=predictions,
        metrics=metrics,
        log=log_file.read_text(),
        scalars=[json.loads(line) for line in scalars_file.read_text().splitlines()],
    )
