"""Training entry pieces: a device-agnostic DDP wrapper, a trainer, and a launcher that also
runs multi-process on CPU (gloo), which Detectron2 v0.6's ``launch`` cannot (it hard-codes NCCL).
"""
from __future__ import annotations

import logging
import os
import socket
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine import launch as detectron2_launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter, get_event_storage
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..analysis.console import routing_console_line
from ..core import STATS_PREFIX
from .checkpoint import SafeDetectionCheckpointer

DEFAULT_TIMEOUT = timedelta(minutes=30)


def has_fast_coco_eval() -> bool:
    """Whether Detectron2 was built with its C++ ops (needed by the fast COCOeval)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Wrap in DDP when there are several processes; ``device_ids`` only for a CUDA model."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and next(model.parameters()).is_cuda:
        kwargs["device_ids"] = [comm.get_local_rank()]
    return DistributedDataParallel(model, **kwargs)


class HIMoEMetricPrinter(CommonMetricPrinter):
    """``CommonMetricPrinter`` plus, whenever the ROI heads wrote new routing statistics, one
    compact line (``routing_console_line``: expert load max/min, routing entropy, dropped
    fraction; over the layers of a cascade, their extremes), e.g.
    ``himoe: load max 0.210 min 0.052  routing_entropy 1.021  dropped_fraction 0.000``.
    (The full ``himoe/*`` statistics go to metrics.json and TensorBoard.)"""

    def __init__(self, max_iter=None, window_size: int = 20):
        super().__init__(max_iter, window_size)
        self._routing_iter = -1

    def write(self):
        super().write()
        storage = get_event_storage()
        if storage.iter == self._max_iter:
            return
        fresh = {name: entry for name, entry in storage.latest().items()
                 if name.startswith(STATS_PREFIX) and entry[1] > self._routing_iter}
        summary = routing_console_line({name: value for name, (value, _) in fresh.items()})
        if summary:
            self._routing_iter = max(iteration for _, iteration in fresh.values())
            self.logger.info(summary)


class HIMoETrainer(DefaultTrainer):
    """``DefaultTrainer`` that also trains with several CPU processes and evaluates COCO-format
    datasets with ``COCOEvaluator`` (fast C++ COCOeval when Detectron2 has it)."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with create_ddp_model above (v0.6's passes device_ids=[rank],
        # which DDP rejects for a CPU model).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # Detectron2 v0.6's DefaultTrainer checkpoints only the iteration and hooks; the optimizer
    # (momentum, AMP scaler) lives in self._trainer. Later versions save it like this too.
    def state_dict(self):
        state = super().state_dict()
        state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger(__name__).warning("checkpoint has no optimizer state; starting it fresh")

    def build_writers(self):
        """Detectron2's default writers, with the console printer showing routing statistics."""
        return [
            HIMoEMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_fast_coco_eval())


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """``detectron2.engine.launch``; without CUDA, ``num_gpus_per_machine`` CPU processes on gloo."""
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available():
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout
        )
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url must name the rank-0 machine in multi-machine CPU jobs")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs_per_machine))
    if hasattr(comm, "create_local_process_group"):  # Detectron2 after v0.6
        comm.create_local_process_group(procs_per_machine)
    else:  # v0.6: the same group, set the way its own launcher sets it
        for machine in range(world_size // procs_per_machine):
            ranks = list(range(machine * procs_per_machine, (machine + 1) * procs_per_machine))
            group = dist.new_group(ranks)
            if machine == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
