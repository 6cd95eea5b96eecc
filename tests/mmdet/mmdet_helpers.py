"""Paths and helpers shared by the MMDetection adapter tests."""
import os
import sys
from pathlib import Path
from typing import Dict

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
