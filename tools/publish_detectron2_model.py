#!/usr/bin/env python
"""Turn a Detectron2 training checkpoint into a model-zoo file (like mmdet's publish_model.py).

    python tools/publish_detectron2_model.py output/model_final.pth himoe_faster_rcnn_R_50_FPN_1x.pth

Keeps only the model weights (drops optimizer, scheduler and iteration), and names the output
``<stem>-<first 8 hex digits of its sha256>.pth``. The HI-MoE heads' ``num_experts`` buffers stay,
so loading the file into a model configured with another number of experts fails clearly.
Inputs load safely: ``.pth`` with ``torch.load(weights_only=True)``, Detectron2 model-zoo ``.pkl``
with the plugin's restricted unpickler (numpy arrays become tensors).
"""
import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch

from himoe_plugin.detectron2.checkpoint import load_pkl


def publish(in_file: Path, out_file: Path) -> Path:
    if in_file.suffix == ".pkl":
        checkpoint = load_pkl(str(in_file))
    else:
        checkpoint = torch.load(in_file, map_location="cpu", weights_only=True)
    model = checkpoint["model"] if "model" in checkpoint else checkpoint
    model = {name: torch.as_tensor(value) if isinstance(value, np.ndarray) else value for name, value in model.items()}
    torch.save({"model": model, "__author__": "himoe-plugin"}, out_file)
    digest = hashlib.sha256(out_file.read_bytes()).hexdigest()[:8]
    final = out_file.with_name(f"{out_file.stem}-{digest}{out_file.suffix}")
    out_file.rename(final)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_file", type=Path, help="checkpoint written by the trainer")
    parser.add_argument("out_file", type=Path, help="output path; the hash is added to its name")
    args = parser.parse_args()
    print(publish(args.in_file, args.out_file))


if __name__ == "__main__":
    main()
