#!/usr/bin/env bash
# Shared by dist_train.sh and dist_test.sh: _dist_launch.sh {train|test} ARGS...
set -euo pipefail
MODE=$1; shift
PYTHON=${PYTHON:-python}
PYTHON=$(command -v "$PYTHON")
HERE=$(cd "$(dirname "$0")" && pwd)
TOOLS=$("$PYTHON" -c 'import mmdet, os; print(os.path.join(os.path.dirname(mmdet.__file__), ".mim", "tools"))')
# mmdet's launch scripts call plain `python`: make it the chosen interpreter.
export PATH="$(dirname "$PYTHON"):$PATH"

if [ "$MODE" = train ]; then NPROC_ARG=2; else NPROC_ARG=3; fi
if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    exec bash "$TOOLS/dist_$MODE.sh" "$@"
fi
NPROC=${!NPROC_ARG}
ARGS=("${@:1:$((NPROC_ARG - 1))}" "${@:$((NPROC_ARG + 1))}")
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$HERE/run_tool.py" "$MODE.py" "${ARGS[@]}" --launcher pytorch
