#!/usr/bin/env bash
# Multi-process training with MMDetection's own tools, unchanged:
#   tools/mmdet/dist_train.sh CONFIG NUM_PROCESSES [train.py options]
# With CUDA: runs mmdet's tools/dist_train.sh (one process per GPU; NNODES, NODE_RANK,
# PORT, MASTER_ADDR as there). Without CUDA: the same through torch.distributed.run and
# run_tool.py (gloo). PYTHON selects the interpreter (default: python on PATH).
set -euo pipefail
exec "$(dirname "$0")/_dist_launch.sh" train "$@"
