"""MMEngine pieces for HI-MoE training runs: routing statistics at the logger's interval, a log
processor that shows them as one compact console line, and checkpoints that
``torch.load(weights_only=True)`` reads without any allow-list."""
from __future__ import annotations

from typing import Optional, Tuple

import numbers

import numpy as np
import torch
from mmdet.registry import HOOKS, LOG_PROCESSORS
from mmengine.hooks import Hook, LoggerHook
from mmengine.logging import HistoryBuffer
from mmengine.model import is_model_wrapper
from mmengine.runner import LogProcessor

from ..analysis.console import routing_console_line
from ..core import STATS_PREFIX
from .moe_settings import STATS_BY_HOOK, write_routing_statistics

#: Marks a ``HistoryBuffer`` stored as plain tensors in a checkpoint's message hub.
HISTORY_BUFFER_TAG = '__himoe_history_buffer__'


@HOOKS.register_module()
class RoutingStatisticsHook(Hook):
    """Write the routing statistics (``train/himoe/...``) to the message hub exactly when the
    ``LoggerHook`` logs: its interval is read from the runner when training starts, so
    ``--cfg-options default_hooks.logger.interval=N`` is followed. While this hook runs, the
    models' own ``stats_period`` is not used. Add it to a config with
    ``custom_hooks = [dict(type='RoutingStatisticsHook')]``.
    """

    priority = 'NORMAL'  # after_train_iter before the LoggerHook (BELOW_NORMAL)

    def __init__(self) -> None:
        self._logger: Optional[LoggerHook] = None

    def before_train(self, runner) -> None:
        loggers = [hook for hook in runner.hooks if isinstance(hook, LoggerHook)]
        if not loggers:
            raise RuntimeError("RoutingStatisticsHook writes the statistics when the LoggerHook logs, "
                               "but the runner has none (default_hooks.logger)")
        self._logger = loggers[0]
        runner.message_hub.update_info(STATS_BY_HOOK, True, resumed=False)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        logger = self._logger
        if logger.every_n_inner_iters(batch_idx, logger.interval) or \
                logger.end_of_epoch(runner.train_dataloader, batch_idx):
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            write_routing_statistics(model, runner.message_hub)

    def after_train(self, runner) -> None:
        runner.message_hub.update_info(STATS_BY_HOOK, False, resumed=False)


#: Separator of the items of MMEngine's console log line.
LOG_ITEM_SEPARATOR = '  '


@LOG_PROCESSORS.register_module()
class HIMoELogProcessor(LogProcessor):
    """``LogProcessor`` whose training console line shows the routing statistics as one compact
    ``himoe:`` line (``routing_console_line``) after the losses instead of every ``himoe/*`` value
    inline (a DINO with 12 MoE layers logs about 130); the returned tag, which the ``LoggerHook``
    writes to the visualizer (``vis_data/scalars.json``, TensorBoard), keeps every value.
    Select it with ``log_processor = dict(type='HIMoELogProcessor')`` (it takes
    ``LogProcessor``'s arguments)."""

    def get_log_after_iter(self, runner, batch_idx: int, mode: str) -> Tuple[dict, str]:
        tag, log_str = super().get_log_after_iter(runner, batch_idx, mode)
        if mode != 'train':
            return tag, log_str
        items = log_str.split(LOG_ITEM_SEPARATOR)
        kept = [item for item in items if not item.startswith(STATS_PREFIX)]
        if len(kept) == len(items):
            return tag, log_str
        prefix = f'{mode}/'
        statistics = {key[len(prefix):] if key.startswith(prefix) else key: value
                      for key, value in tag.items()
                      if isinstance(value, numbers.Real) and
                      (key[len(prefix):] if key.startswith(prefix) else key).startswith(STATS_PREFIX)}
        return tag, LOG_ITEM_SEPARATOR.join(kept).rstrip() + '\n' + routing_console_line(statistics)


@HOOKS.register_module()
class WeightsOnlyCheckpointHook(Hook):
    """Save checkpoints that ``torch.load`` reads with its ``weights_only=True`` default (torch
    >= 2.6) without any allow-list, so that tools which do not import this plugin (mmdet's
    ``publish_model.py``, ``torch.load`` in user code) load them.

    MMEngine stores the message hub's ``HistoryBuffer`` objects (numpy arrays) and numpy scalars
    in its checkpoints. Before saving, this hook stores every buffer as tensors (lossless) and
    numpy scalars as Python numbers; after loading (``resume``, ``load_from``) it rebuilds the
    buffers, so resuming is unchanged. Add it with ``custom_hooks=[dict(type='WeightsOnlyCheckpointHook')]``.
    """

    priority = 'VERY_LOW'

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get('message_hub')
        if hub is None:
            return
        hub['log_scalars'] = {
            key: {HISTORY_BUFFER_TAG: True, 'max_length': buffer.max_length,
                  'log': torch.from_numpy(np.asarray(buffer.data[0])),
                  'count': torch.from_numpy(np.asarray(buffer.data[1]))}
            if isinstance(buffer, HistoryBuffer) else buffer
            for key, buffer in hub['log_scalars'].items()}
        hub['runtime_info'] = {key: value.item() if isinstance(value, np.generic) else value
                               for key, value in hub['runtime_info'].items()}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get('message_hub')
        if hub is None:
            return
        hub['log_scalars'] = {
            key: HistoryBuffer(value['log'].numpy(), value['count'].numpy(), value['max_length'])
            if isinstance(value, dict) and value.get(HISTORY_BUFFER_TAG) else value
            for key, value in hub['log_scalars'].items()}
