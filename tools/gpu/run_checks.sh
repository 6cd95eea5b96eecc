#!/usr/bin/env bash
# Check the CUDA path of himoe-plugin on a GPU machine in one call, offline, inside ~9 minutes.
#
#   bash tools/gpu/run_checks.sh                  # on the device: bundle gpu_bundle/, results in $OUT
#   bash tools/gpu/run_checks.sh --device cpu --tiny --bundle B --out O   # CPU dry run (tests/test_gpu_kit.py)
#
# Options: --device cuda|cpu (default cuda), --tiny (toy sizes), --bundle DIR (default gpu_bundle,
# made by tools/gpu/make_bundle.sh), --out DIR (default $OUT, else output/gpu_checks),
# --budget-s S (default 510: every stage ends by then). PYTHON picks the interpreter (default python3).
#
# Stages, each under `timeout` and each recorded whatever the others did:
#   install          pip install --no-index the bundle's wheels into a scratch site (cpu: skipped,
#                    the current environment is used as it is)
#   environment      GPU, driver, Python and package versions
#   cuda_tests       pytest tests/cuda -m cuda (on cpu: their CPU counterparts)
#   bench_moe_layer_grouped_mm, bench_moe_layer_loop
#                    benchmarks/moe_layer.py --quick --autocast bfloat16, one per expert backend
#   bench_detector   benchmarks/detector.py --frameworks detectron2 (dense vs HI-MoE k=1, k=2)
#   quality          dense vs HI-MoE Faster R-CNN R18-FPN on the compact Aquarium from scratch
#                    (same seed and schedule, AMP, batch 16), COCO AP on valid; sized to the time left
# Results: $OUT/summary.json (every stage's status, the environment, test counts, benchmark and
# quality results), $OUT/run_checks.log, $OUT/checks.tar.gz (every log and result file).
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
DEVICE=cuda
TINY=0
BUNDLE="$REPO_ROOT/gpu_bundle"
RESULTS="${OUT:-$REPO_ROOT/output/gpu_checks}"
BUDGET_S=510

while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift ;;
        --tiny) TINY=1 ;;
        --bundle) BUNDLE="$2"; shift ;;
        --out) RESULTS="$2"; shift ;;
        --budget-s) BUDGET_S="$2"; shift ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run_checks: unknown argument '$1'" >&2; exit 2 ;;
    esac
    shift
done
case "$DEVICE" in cuda|cuda:*|cpu) ;; *) echo "run_checks: --device must be cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac
[[ -d "$BUNDLE/data" ]] || { echo "run_checks: no bundle at $BUNDLE (run tools/gpu/make_bundle.sh, carry it)" >&2; exit 2; }
BUNDLE="$(cd "$BUNDLE" && pwd)"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/himoe_gpu_checks.XXXXXX")"
mkdir -p "$WORK/logs"
: > "$WORK/stages.tsv"
exec > >(tee "$RESULTS/run_checks.log") 2>&1
cd "$REPO_ROOT"
export HIMOE_DATA_ROOT="$BUNDLE/data" HIMOE_CUDA_TESTS_DEVICE="$DEVICE" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
SECONDS=0
DEADLINE="$BUDGET_S"
STAGE_SCALE=1; (( TINY )) && [[ "$DEVICE" == cpu ]] && STAGE_SCALE=4  # a CPU takes longer, even at toy sizes

log() { printf '[run_checks %3ds] %s\n' "$SECONDS" "$*"; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/stages.tsv"; }

# stage NAME BUDGET_S COMMAND...: runs COMMAND under timeout (never past the deadline), logs it.
stage() {
    local name="$1" budget="$2"; shift 2
    local left=$(( DEADLINE - SECONDS - 15 ))  # 15 s kept for the summary
    if (( left < 20 )); then
        log "stage $name: skipped, ${left}s left"; record "$name" skipped 0 "$budget" "no time left"; return
    fi
    budget=$(( budget * STAGE_SCALE ))
    (( budget > left )) && budget=$left
    log "stage $name (at most ${budget}s): $*"
    local start=$SECONDS rc status
    timeout --kill-after=10 "$budget" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in 0) status=passed ;; 124|137) status=timeout ;; *) status=failed ;; esac
    record "$name" "$status" $(( SECONDS - start )) "$budget" "exit $rc"
    log "stage $name: $status in $(( SECONDS - start ))s"
    [[ $status == passed ]] || tail -n 25 "$WORK/logs/$name.log" | sed 's/^/    | /'
}

install_bundle() {  # the bundle's wheels into $SITE; setuptools only if the image's lacks pkg_resources
    local wheels=()
    for wheel in "$BUNDLE"/wheels/*.whl; do
        if [[ "$(basename "$wheel")" == setuptools-* ]] && "$PY" -c "import pkg_resources" 2>/dev/null; then
            continue
        fi
        wheels+=("$wheel")
    done
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "${wheels[@]}" \
    && "$PY" -c "import detectron2.model_zoo, fvcore, pycocotools, omegaconf, hydra, himoe_plugin.detectron2; print('imports ok')"
}

log "device $DEVICE, tiny $TINY, bundle $BUNDLE, results $RESULTS, details $WORK, budget ${BUDGET_S}s"
if [[ "$DEVICE" == cpu ]]; then
    record install skipped 0 0 "--device cpu: the current environment is used as it is"
    export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    SITE="$WORK/site"
    export PYTHONPATH="$REPO_ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export -f install_bundle; export PY BUNDLE SITE
    stage install 90 bash -c install_bundle
fi

stage environment 60 "$PY" tools/gpu/checks.py environment --out "$WORK/environment.json"

stage cuda_tests 150 "$PY" -m pytest tests/cuda -m cuda -p no:cacheprovider \
    -q -rA --junitxml "$WORK/cuda_tests.xml"

if (( TINY )); then
    MOE_ARGS=(--repeats 1); DETECTOR_ARGS=(--size 64 --repeats 1); QUALITY_ARGS=(--tiny --batch 2)
else
    MOE_ARGS=(--repeats 5); DETECTOR_ARGS=(--size 512 --repeats 5); QUALITY_ARGS=(--batch 16)
fi
TINY_FLAG=(); (( TINY )) && TINY_FLAG=(--tiny)
for backend in grouped_mm loop; do
    stage "bench_moe_layer_$backend" 75 "$PY" tools/gpu/checks.py bench --work "$WORK" "${TINY_FLAG[@]}" moe_layer -- \
        --device "$DEVICE" --quick --autocast bfloat16 --expert-backend "$backend" --name "moe_layer_$backend" \
        "${MOE_ARGS[@]}"
done
stage bench_detector 150 "$PY" tools/gpu/checks.py bench --work "$WORK" "${TINY_FLAG[@]}" detector -- \
    --device "$DEVICE" --frameworks detectron2 "${DETECTOR_ARGS[@]}"

QUALITY_BUDGET=$(( DEADLINE - SECONDS - 15 - 10 ))
stage quality "$QUALITY_BUDGET" "$PY" tools/gpu/checks.py quality --work "$WORK/quality" --data-root "$BUNDLE/data" \
    --device "$DEVICE" --budget-s $(( QUALITY_BUDGET - 5 )) "${QUALITY_ARGS[@]}"

log "summary"
"$PY" tools/gpu/checks.py summary --work "$WORK" --out "$WORK/summary.json" device="$DEVICE" tiny="$TINY" \
    budget_s="$BUDGET_S" total_s="$SECONDS" || log "summary failed"
cp "$WORK/summary.json" "$RESULTS/summary.json" 2>/dev/null
# Everything else in one archive: a device call brings back at most 8 files from $OUT.
tar -czf "$RESULTS/checks.tar.gz" -C "$WORK" --exclude=./site --exclude=./bench/configs --exclude='*.pth' .
log "done in ${SECONDS}s: $RESULTS/summary.json, $RESULTS/checks.tar.gz"
rm -rf "$WORK"
