#!/usr/bin/env bash
# Multi-process testing with MMDetection's own tools, unchanged:
#   tools/mmdet/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [test.py options]
# See dist_train.sh.
set -euo pipefail
exec "$(dirname "$0")/_dist_launch.sh" test "$@"
