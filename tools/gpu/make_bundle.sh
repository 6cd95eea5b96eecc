#!/usr/bin/env bash
# Prepare everything a CUDA device run needs offline, in one folder that a device call can carry.
#
#   tools/gpu/make_bundle.sh                 # full bundle in gpu_bundle/ (downloads from PyPI)
#   tools/gpu/make_bundle.sh --check-deps    # only list the wheels a full bundle would download
#   tools/gpu/make_bundle.sh --tiny --out D  # no dependency downloads, 8 images per split (CI dry run)
#
# The bundle (docs/INSTALL.md, "Check a CUDA machine"):
#   wheels/   cp312 manylinux wheels of every dependency in tools/gpu/device-requirements.txt that
#             the device image lacks (resolved by pip for Python 3.12, minus
#             tools/gpu/device-image-packages.txt), the patched Detectron2 v0.6 and himoe-plugin
#   data/     compact copy of the bundled datasets (tools/gpu/compact_dataset.py: short side 320,
#             JPEG quality 80; Aquarium train + valid and COCO128, labels rescaled)
#   SIZE.json measured sizes; tools/gpu/check_bundle.py fails if bundle + working tree > 64 MiB
# Run it on a CPU machine with the development environment (.venv, tools/env/setup_env.sh) and
# PyPI access. The sources and built wheels are cached in $HIMOE_BUNDLE_CACHE.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
CACHE="${HIMOE_BUNDLE_CACHE:-$HOME/.cache/himoe-plugin/bundle}"
DATA_ROOT="${HIMOE_DATA_ROOT:-$REPO_ROOT/../shared/data}"
LIMIT_MIB="${HIMOE_BUNDLE_LIMIT_MIB:-64}"
OUT="$REPO_ROOT/gpu_bundle"
MODE=full
SHORT_SIDE=320
QUALITY=80

# Same verified sources as tools/env/setup_env.sh.
D2_URL="https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Needed on the device but published as an sdist only: built here into a pure-Python wheel.
SDIST_ONLY=("antlr4-python3-runtime==4.9.3" "fvcore==0.1.5.post20221221")
# Bundled although the image has setuptools: Detectron2 v0.6's model_zoo imports pkg_resources,
# which setuptools >= 81 dropped. run_checks.sh installs it only if the image's lacks pkg_resources.
FALLBACKS=("setuptools>=77,<81")
PLATFORM_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for n in 39 35 34 31 28 27 24 17; do PLATFORM_ARGS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORM_ARGS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tiny) MODE=tiny ;;
        --check-deps) MODE=check-deps ;;
        --out) OUT="$2"; shift ;;
        --short-side) SHORT_SIDE="$2"; shift ;;
        --quality) QUALITY="$2"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "make_bundle: unknown argument '$1'" >&2; usage 2 ;;
    esac
    shift
done

log() { printf '[make_bundle %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }
[[ -x "$PY" ]] || { echo "make_bundle: no python at $PY (build .venv with tools/env/setup_env.sh or set PYTHON)" >&2; exit 1; }
mkdir -p "$CACHE/local-wheels"

# Wheels of the sdist-only dependencies, built once into the cache.
build_sdist_only_wheels() {
    for spec in "${SDIST_ONLY[@]}"; do
        local stem="${spec%%==*}"; stem="${stem//-/_}-${spec##*==}"
        if ! ls "$CACHE/local-wheels/$stem"-py*-none-any.whl >/dev/null 2>&1; then
            log "building a wheel of $spec (sdist only on PyPI)"
            pip_ wheel -q --no-deps --no-binary :all: -w "$CACHE/local-wheels" "$spec"
        fi
    done
}

# "name==version" of every distribution the device lacks (resolved for CPython 3.12 manylinux).
resolve_missing() {
    local report="$CACHE/resolution.json"
    pip_ install -q --dry-run --ignore-installed --target "$CACHE/resolve-target" --report "$report" \
        "${PLATFORM_ARGS[@]}" --find-links "$CACHE/local-wheels" \
        -r "$REPO_ROOT/tools/gpu/device-requirements.txt" "${SDIST_ONLY[@]}" >&2
    "$PY" - "$report" "$REPO_ROOT/tools/gpu/device-image-packages.txt" <<'EOF'
import json, sys
from packaging.utils import canonicalize_name
report, image_list = sys.argv[1:]
image = {canonicalize_name(l.strip()) for l in open(image_list) if l.strip() and not l.startswith("#")}
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    if canonicalize_name(meta["name"]) not in image:
        print(f"{meta['name']}=={meta['version']}")
EOF
}

if [[ "$MODE" == check-deps ]]; then
    build_sdist_only_wheels
    log "distributions a full bundle downloads (resolved for CPython 3.12 manylinux x86_64, minus the device image):"
    resolve_missing
    printf '%s (fallback, installed only where needed)\n' "${FALLBACKS[@]}"
    exit 0
fi

SECONDS=0
if [[ -e "$OUT" && ! -d "$OUT/wheels" && -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then
    echo "make_bundle: $OUT exists and is not a bundle: not overwriting it" >&2; exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT/wheels"

log "compact data from $DATA_ROOT (short side $SHORT_SIDE, JPEG quality $QUALITY)"
LIMIT=0; [[ "$MODE" == tiny ]] && LIMIT=8
"$PY" "$REPO_ROOT/tools/gpu/compact_dataset.py" --src "$DATA_ROOT" --dst "$OUT/data" \
    --short-side "$SHORT_SIDE" --quality "$QUALITY" --limit "$LIMIT"

if [[ "$MODE" == full ]]; then
    build_sdist_only_wheels
    mapfile -t MISSING < <(resolve_missing)
    log "downloading ${#MISSING[@]} wheels: ${MISSING[*]} (and the fallback ${FALLBACKS[*]})"
    # pip's HTTP cache makes a rebuild cheap; find-links supplies the locally built wheels.
    pip_ download -q --no-deps "${PLATFORM_ARGS[@]}" --find-links "$CACHE/local-wheels" \
        -d "$OUT/wheels" "${MISSING[@]}" "${FALLBACKS[@]}"
fi

log "Detectron2 v0.6 wheel (pb1-detectron2 sdist, patched as in tools/env/setup_env.sh, no C++ ops)"
D2_SDIST="$CACHE/pb1-detectron2-0.6.tar.gz"
if [[ ! -f "$D2_SDIST" ]] || ! echo "$D2_SHA256  $D2_SDIST" | sha256sum --check --status; then
    curl -fsSL --retry 3 -o "$D2_SDIST.part" "$D2_URL"
    echo "$D2_SHA256  $D2_SDIST.part" | sha256sum --check --status \
        || { echo "make_bundle: sha256 mismatch for $D2_URL" >&2; exit 1; }
    mv "$D2_SDIST.part" "$D2_SDIST"
fi
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
tar -xzf "$D2_SDIST" -C "$BUILD"
"$PY" "$REPO_ROOT/tools/env/patch_detectron2.py" "$BUILD/pb1-detectron2-0.6"
pip_ wheel -q --no-deps --no-build-isolation -w "$OUT/wheels" "$BUILD/pb1-detectron2-0.6"

log "himoe-plugin wheel (this checkout)"
# From the files that travel (tracked and untracked, not ignored): no caches, no egg-info.
mkdir "$BUILD/plugin"
cp "$REPO_ROOT/setup.py" "$REPO_ROOT/README.md" "$BUILD/plugin/"
(cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard himoe_plugin \
    | xargs -0 cp --parents -t "$BUILD/plugin")
pip_ wheel -q --no-deps --no-build-isolation -w "$OUT/wheels" "$BUILD/plugin"

log "checking the bundle (wheels install together; bundle + working tree <= $LIMIT_MIB MiB)"
"$PY" "$REPO_ROOT/tools/gpu/check_bundle.py" "$OUT" --limit-mib "$LIMIT_MIB" --repo "$REPO_ROOT"
log "bundle ($MODE) ready in ${SECONDS}s: $OUT"
