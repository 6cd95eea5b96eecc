#!/usr/bin/env bash
# Build the himoe-plugin development environment (.venv) on a fresh CPU machine.
#
# The route is documented step by step in docs/INSTALL.md. Each step is idempotent: re-running
# the script skips what is already installed. The compiled mmcv wheel is cached in
# $HIMOE_WHEEL_CACHE (default ~/.cache/himoe-plugin/wheels) and reused when present.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${HIMOE_VENV:-$REPO_ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
WHEEL_CACHE="${HIMOE_WHEEL_CACHE:-$HOME/.cache/himoe-plugin/wheels}"
BUILD_DIR="${HIMOE_BUILD_DIR:-$REPO_ROOT/.build}"

TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
D2_URL="https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
MMCV_URL="https://files.pythonhosted.org/packages/a7/19/f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-2.1.0.tar.gz"
MMCV_SHA256="d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f"

log() { printf '\n[setup_env %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

fetch_verified() {  # url sha256 dest
    local url="$1" sha="$2" dest="$3"
    if [[ ! -f "$dest" ]] || ! echo "$sha  $dest" | sha256sum --check --status; then
        curl -fsSL --retry 3 -o "$dest.part" "$url"
        echo "$sha  $dest.part" | sha256sum --check --status \
            || { echo "sha256 mismatch for $url" >&2; exit 1; }
        mv "$dest.part" "$dest"
    fi
}

mkdir -p "$WHEEL_CACHE" "$BUILD_DIR"
SECONDS=0

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

log "torch ($TORCH_PINS), build tools and the runtime dependencies of detectron2, mmcv, mmdet"
# torch >= 2.14 needs setuptools >= 77; mmcv 2.1.0's setup.py needs pkg_resources (gone in 81).
"${PIP[@]}" $TORCH_PINS "setuptools>=77,<81" wheel ninja -r "$REPO_ROOT/tools/env/requirements-stack.txt"

# The mask call fails on an install whose numpy aliases were not patched.
if ! "$PY" -c "import detectron2.model_zoo, detectron2.modeling, detectron2.export
from detectron2.structures.masks import polygons_to_bitmask; polygons_to_bitmask([], 2, 2)" 2>/dev/null; then
    log "detectron2 v0.6 (pb1-detectron2 sdist, patched, no C++ ops)"
    fetch_verified "$D2_URL" "$D2_SHA256" "$BUILD_DIR/pb1-detectron2-0.6.tar.gz"
    rm -rf "$BUILD_DIR/pb1-detectron2-0.6"
    tar -xzf "$BUILD_DIR/pb1-detectron2-0.6.tar.gz" -C "$BUILD_DIR"
    "$PY" "$REPO_ROOT/tools/env/patch_detectron2.py" "$BUILD_DIR/pb1-detectron2-0.6"
    "${PIP[@]}" --no-build-isolation --no-deps "$BUILD_DIR/pb1-detectron2-0.6"
    # Detectron2's stock tools (lazyconfig_train_net.py, analyze_model.py, ...) are not part of
    # the package; keep them next to the environment for the tests and benchmarks.
    mkdir -p "$VENV/share/detectron2"
    cp -r "$BUILD_DIR/pb1-detectron2-0.6/tools" "$VENV/share/detectron2/"
fi

if ! "$PY" -c "import mmcv.ops" 2>/dev/null; then
    MMCV_WHEEL="$(ls "$WHEEL_CACHE"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$MMCV_WHEEL" ]]; then
        log "mmcv 2.1.0 with CPU ops: compiling from sdist (about 15 minutes on 2 cores)"
        fetch_verified "$MMCV_URL" "$MMCV_SHA256" "$BUILD_DIR/mmcv-2.1.0.tar.gz"
        rm -rf "$BUILD_DIR/mmcv-2.1.0"
        tar -xzf "$BUILD_DIR/mmcv-2.1.0.tar.gz" -C "$BUILD_DIR"
        # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes c++14/c++17.
        sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' \
            "$BUILD_DIR/mmcv-2.1.0/setup.py"
        (cd "$BUILD_DIR/mmcv-2.1.0" && MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" \
            "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_CACHE" .)
        MMCV_WHEEL="$(ls "$WHEEL_CACHE"/mmcv-2.1.0-*.whl | head -n1)"
    else
        log "mmcv 2.1.0: reusing cached wheel $MMCV_WHEEL"
    fi
    "${PIP[@]}" --no-deps "$MMCV_WHEEL"
fi

log "mmengine, mmdet and himoe-plugin (editable, with test extras)"
"${PIP[@]}" --no-deps "mmengine==0.10.7" "mmdet==3.3.0"
"${PIP[@]}" --no-build-isolation -e "$REPO_ROOT[test,benchmarks]"

log "checking the stack"
"$PY" - <<'EOF'
import torch, torchvision, detectron2, mmcv, mmcv.ops, mmengine, mmdet
import detectron2.modeling, detectron2.model_zoo
from detectron2.model_zoo import get_config_file
get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
import himoe_plugin.detectron2, himoe_plugin.mmdet
print("torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| detectron2", detectron2.__version__, "| mmcv", mmcv.__version__,
      "| mmengine", mmengine.__version__, "| mmdet", mmdet.__version__)
EOF
log "environment ready in ${SECONDS}s: $VENV"
