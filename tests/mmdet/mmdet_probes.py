"""Test-only MMEngine hook, imported by configs of subprocess runs (``custom_imports``)."""
import json
import os

from mmdet.registry import HOOKS
from mmengine.hooks import Hook


@HOOKS.register_module()
class RankScalarsProbe(Hook):
    """After every training iteration, record this rank's ``train/*`` message-hub scalars;
    after the run, write them to ``<out_dir>/rank<r>.json`` as ``{iter: {name: value}}``."""

    priority = 'LOWEST'

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.records = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.records[runner.iter + 1] = {
            name[len('train/'):]: float(buffer.current())
            for name, buffer in runner.message_hub.log_scalars.items()
            if name.startswith('train/')
        }

    def after_run(self, runner) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f'rank{runner.rank}.json'), 'w') as f:
            json.dump(self.records, f)
