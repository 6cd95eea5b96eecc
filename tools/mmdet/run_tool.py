#!/usr/bin/env python
"""Run one of MMDetection's own tools (``<mmdet>/.mim/tools/<tool>``), unchanged, with
``himoe_plugin.mmdet`` loaded (HI-MoE modules registered; MMEngine checkpoints readable by
``torch.load``'s weights-only default, which e.g. publish_model.py relies on).

    python tools/mmdet/run_tool.py train.py CONFIG [train.py options]
    python tools/mmdet/run_tool.py test.py CONFIG CHECKPOINT [test.py options]
    python tools/mmdet/run_tool.py model_converters/publish_model.py IN_FILE OUT_FILE
    python tools/mmdet/run_tool.py analysis_tools/get_flops.py CONFIG [get_flops.py options]
    python -m torch.distributed.run --nproc_per_node 2 tools/mmdet/run_tool.py \\
        train.py CONFIG --launcher pytorch

After ``analysis_tools/get_flops.py`` (whose FLOPs count the top-k experts each RoI ran, and whose
``Params`` are all parameters), it also prints the parameters one instance runs through: total vs
active.

Started by ``torch.distributed.run`` on a machine without CUDA, it first opens the gloo
process group: MMEngine's ``pytorch`` launcher calls ``torch.cuda.set_device`` (which fails
without a GPU) but skips initialisation when a process group already exists.
"""
import os
import runpy
import sys
from pathlib import Path


def mmdet_tools_dir() -> Path:
    """``tools/`` shipped inside the installed mmdet package."""
    import mmdet

    return Path(mmdet.__file__).resolve().parent / '.mim' / 'tools'


def init_cpu_process_group() -> None:
    """Open the gloo process group when launched by torchrun without CUDA."""
    import torch
    import torch.distributed as dist

    if 'WORLD_SIZE' in os.environ and not torch.cuda.is_available() \
            and not dist.is_initialized():
        dist.init_process_group(backend='gloo')


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    tool = mmdet_tools_dir() / sys.argv[1]
    if not tool.is_file():
        sys.exit(f'no tool {sys.argv[1]!r} in {mmdet_tools_dir()}')
    import himoe_plugin.mmdet  # noqa: F401

    if tool.name in ('train.py', 'test.py', 'get_flops.py') and len(sys.argv) > 2:
        check_config(sys.argv[2])
    init_cpu_process_group()
    sys.argv = [str(tool), *sys.argv[2:]]
    namespace = runpy.run_path(str(tool), run_name='__main__')
    if tool.name == 'get_flops.py':
        print_active_parameters(namespace['parse_args']())


def check_config(config_file: str) -> None:
    """Fail before the tool builds the model when the config puts HI-MoE components on a
    detector that cannot run them (the error says what is supported)."""
    from mmengine.config import Config

    from himoe_plugin.mmdet import check_supported_detector

    check_supported_detector(Config.fromfile(config_file).model)


def print_active_parameters(args) -> None:
    """Total vs active (per instance) parameters of the model ``get_flops.py`` analysed."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from himoe_plugin.core import count_parameters

    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    count = count_parameters(MODELS.build(cfg.model))
    print(f'HI-MoE parameters: total {count.total / 1e6:.2f}M, active per instance '
          f'{count.active / 1e6:.2f}M ({count.active / count.total:.1%}); routed experts '
          f'{count.experts / 1e6:.2f}M. Flops count the experts each instance ran.')


if __name__ == '__main__':
    main()
