#!/usr/bin/env python
"""Turn a Detectron2 training checkpoint into a model-zoo file (like mmdet's publish_model.py).

    python tools/publish_detectron2_model.py output/model_final.pth himoe_faster_rcnn_R_50_FPN_1x.pth

Keeps only the model weights (drops optimizer, scheduler and iteration), and names the output
``<stem>-<first 8 hex digits of its sha256>.pth``. The HI-MoE heads' ``num_experts`` buffers stay,
so loading the file into a model configured with another number of experts fails clearly.
Inputs load safely: ``.pth`` with ``torch.load(weights_only=True)``, Detectron2 model-zoo ``.pkl``
with the plugin's restricted unpickler (numpy arrays become tensors).

The training checkpoint is never modified. An ``out_file`` that is the input, or that exists
(as given or as its hashed name), is refused unless ``--overwrite`` is passed (and the input
itself is refused even then).
"""
import argparse
import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from himoe_plugin.detectron2.checkpoint import load_pkl


class PublishError(ValueError):
    """A publish request that would lose or overwrite data."""


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()


def publish(in_file: Path, out_file: Path, overwrite: bool = False) -> Path:
    """Write the model weights of ``in_file`` to ``<out_file stem>-<sha256[:8]><suffix>``; returns
    that path. Raises ``PublishError`` if ``out_file`` is ``in_file``, or if ``out_file`` or the
    hashed output exists and ``overwrite`` is False; ``FileNotFoundError`` if ``in_file`` does not."""
    in_file, out_file = Path(in_file), Path(out_file)
    if not in_file.is_file():
        raise FileNotFoundError(f"checkpoint {in_file} does not exist")
    if _same_file(in_file, out_file):
        raise PublishError(f"out_file {out_file} is the input checkpoint: publishing would replace the training "
                           "checkpoint (optimizer, scheduler, iteration); choose another output name")
    if out_file.exists() and not overwrite:
        raise PublishError(f"out_file {out_file} exists: pass --overwrite to replace it, or choose another name")
    if in_file.suffix == ".pkl":
        checkpoint = load_pkl(str(in_file))
    else:
        checkpoint = torch.load(in_file, map_location="cpu", weights_only=True)
    model = checkpoint["model"] if "model" in checkpoint else checkpoint
    model = {name: torch.as_tensor(value) if isinstance(value, np.ndarray) else value for name, value in model.items()}
    buffer = io.BytesIO()  # in memory: the archive (and so the hash) does not depend on a file name
    torch.save({"model": model, "__author__": "himoe-plugin"}, buffer)
    content = buffer.getvalue()
    final = out_file.with_name(f"{out_file.stem}-{hashlib.sha256(content).hexdigest()[:8]}{out_file.suffix}")
    if _same_file(in_file, final):
        raise PublishError(f"the published name {final} is the input checkpoint; choose another output name")
    if final.exists() and not overwrite:
        raise PublishError(f"{final} exists: pass --overwrite to replace it, or choose another name")
    final.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name next to it, then renamed: no half-written file under the name.
    handle, temporary = tempfile.mkstemp(suffix=final.suffix, prefix=f".{final.stem}-", dir=final.parent)
    with os.fdopen(handle, "wb") as f:
        f.write(content)
    os.replace(temporary, final)
    return final


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_file", type=Path, help="checkpoint written by the trainer (left unchanged)")
    parser.add_argument("out_file", type=Path, help="output path; the hash is added to its name")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        published = publish(args.in_file, args.out_file, args.overwrite)
    except (PublishError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(published)
    return published


if __name__ == "__main__":
    main(sys.argv[1:])
