#!/usr/bin/env bash
# The prepared GPU check of issue 11, from the repository root of a bare GPU machine:
#   1. installs what the machine lacks from carried wheels (.whl/, made by fetch_wheels.sh; only
#      packages not already installed, into /tmp/clip3d-site: pip --no-index, nothing downloaded),
#   2. runs the `gpu` tests (pytest -m gpu tests/test_gpu.py),
#   3. runs `clip3d bench --device cuda` phases, most important first: the small config at 120k
#      and 30k points, fp32 and fp16, both sparse backends; the six-camera 448x800 ViT-B/16
#      (random weights) fusion model; the panoptic model (small config, its decoder and merge as
#      stages, fp32: the panoptic path runs fp32 only); torch.compile; the default config; TF32,
#   4. writes gpu_check.json, gpu_check.md (medians / p90, peak GPU memory, the ratios
#      spconv / spconv-triton and fp32 / fp16 of one run, the targets) and check.log to the output
#      folder, refreshed after every phase, so a run stopped early keeps what it measured.
# Every phase has a time cap inside one overall budget (default 460 s: the whole check stays
# under 8 minutes). CPU dry run (a CI test, about a minute): --device cpu --quick.
#
# usage: bash benchmarks/gpu/check.sh [--out DIR] [--device cuda|cpu] [--quick] [--budget-s S]
#        bash benchmarks/gpu/check.sh --stage DIR   # only park DIR's wheel parts for the next call
# env:   PYTHON (default python3), OUT (default output folder), CLIP3D_WHEEL_STAGE (/tmp/clip3d-wheels)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$REPO/outputs/gpu_check}
DEVICE=cuda
QUICK=0
BUDGET=460
STAGE_ONLY=
STAGE=${CLIP3D_WHEEL_STAGE:-/tmp/clip3d-wheels}
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUTDIR=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --budget-s) BUDGET=$2; shift 2 ;;
    --stage) STAGE_ONLY=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

if [[ -n $STAGE_ONLY ]]; then  # first of two calls: park what does not fit in one call's 64 MiB
  mkdir -p "$STAGE" && cp "$STAGE_ONLY"/* "$STAGE"/ && ls -l "$STAGE"
  exit $?
fi

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d)  # per-phase files (the device tool returns at most 8 files from $OUT)
LOG=$OUTDIR/check.log
PHASES=$WORK/phases.tsv
: >"$PHASES"
exec > >(tee -a "$LOG") 2>&1
TEE=$!
START=$SECONDS
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/clip3d-triton-cache}  # shared by every process
echo "clip3d GPU check: device $DEVICE, quick $QUICK, budget ${BUDGET}s, out $OUTDIR, $(date -u +%FT%TZ)"

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$PHASES"; }

# ---------------------------------------------------------------------------- 1. wheels
install_wheels() {
  local t0=$SECONDS missing=() whl sum
  mkdir -p "$STAGE"
  if [[ -d .whl ]]; then
    find .whl -maxdepth 1 -type f \( -name '*.whl' -o -name '*.whl.part-*' -o -name '*.whl.sha256' \) \
      -exec cp {} "$STAGE"/ \;
  fi
  for sum in "$STAGE"/*.whl.sha256; do  # a wheel split over two calls: join and verify
    [[ -e $sum ]] || continue
    whl=${sum%.sha256}
    [[ -f $whl ]] && continue
    cat "$whl".part-* >"$whl.tmp" 2>/dev/null
    if [[ $(sha256sum <"$whl.tmp" | cut -d' ' -f1) == $(cat "$sum") ]]; then
      mv "$whl.tmp" "$whl"
    else
      rm -f "$whl.tmp"
      echo "WARNING: $(basename "$whl") incomplete (parts: $(ls "$whl".part-* 2>/dev/null | wc -l));" \
        "make the staging call first (README: GPU check). Continuing without it."
    fi
  done
  mapfile -t missing < <("$PY" benchmarks/gpu/wheels_to_install.py "$STAGE")
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing ${#missing[@]} wheels: $(for w in "${missing[@]}"; do basename "$w"; done | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/clip3d-site "${missing[@]}" || { record install 1 $((SECONDS - t0)) "pip failed"; return 1; }
    export PYTHONPATH=/tmp/clip3d-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  record install 0 $((SECONDS - t0)) "${#missing[@]} wheels"
}
install_wheels
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [[ -z ${CLIP3D_SHARED_DATA:-} && -f .whl/data/semantickitti_scan/000000.bin ]]; then
  export CLIP3D_SHARED_DATA=$REPO/.whl/data  # the real scan as bench input (fetch_wheels.sh)
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
"$PY" - <<'EOF'
import torch, clip3d_core
from clip3d_core.model import sparse_backend
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("sparse backends:", sparse_backend.available())
EOF

# ---------------------------------------------------------------------------- phases
report() {
  "$PY" benchmarks/gpu/report.py "$WORK"/bench-*.json --phases "$PHASES" --junit "$WORK/pytest.xml" \
    --json-out "$OUTDIR/gpu_check.json" --md-out "$OUTDIR/gpu_check.md" >/dev/null
}

# run_phase NAME CAP_S CMD...: CMD under `timeout min(CAP_S, time left)`; skipped when < 20 s remain
run_phase() {
  local name=$1 cap=$2 left t0=$SECONDS rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s of the budget left"
    record "$name" -1 0 "skipped: out of budget"
    return
  fi
  ((cap > left)) && cap=$left
  echo "== $name (cap ${cap}s): $*"
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  record "$name" "$rc" $((SECONDS - t0)) "$( ((rc == 124 || rc == 137)) && echo "stopped at the ${cap}s cap")"
  ((QUICK)) || report  # a report after every phase: a call stopped early keeps what it measured
}

bench() {  # bench TAG CAP_S ARGS...
  local tag=$1 cap=$2
  shift 2
  NBENCH=$((NBENCH + 1))  # files in phase order: the report lists them so
  run_phase "bench-$tag" "$cap" "$PY" -m clip3d_core.cli bench --device "$DEVICE" --tag "$tag" \
    --json-out "$WORK/bench-$(printf '%02d' "$NBENCH")-$tag.json" "$@"
}
NBENCH=0

# --timeout: a stuck test fails alone (pytest-timeout) and the session still writes its report.
run_phase pytest-gpu $((QUICK ? 60 : 150)) "$PY" -m pytest -v -rs -m gpu -p no:cacheprovider --timeout 75 \
  --junitxml "$WORK/pytest.xml" -o junit_logging=no tests/test_gpu.py

BOTH=(--backend spconv spconv_triton)
if ((QUICK)); then  # every phase's code path at toy sizes, one thread (a shared CPU)
  QUICKARGS=(--config small --points 2000 --precision fp32 --runs 2 --warmup 1 --threads 1 --in-process)
  bench lidar 60 "${QUICKARGS[@]}" "${BOTH[@]}"
  bench fusion 40 "${QUICKARGS[@]}" --fusion-cameras 2 --image-size 64 112 --clip-model clip3d-tiny
  bench compile 40 "${QUICKARGS[@]}" --compile --compile-backend eager
  bench panoptic 40 "${QUICKARGS[@]}" --head panoptic
else
  bench lidar-small 100 --config small --points 120000 30000 --precision fp32 fp16 "${BOTH[@]}" \
    --runs 20 --warmup 3 --time-budget-s 12
  bench fusion 60 --config small --points 120000 --precision fp16 fp32 --fusion-cameras 6 \
    --image-size 448 800 --clip-model ViT-B-16 --runs 15 --warmup 3 --time-budget-s 12
  bench panoptic 45 --head panoptic --config small --points 120000 30000 --precision fp32 "${BOTH[@]}" \
    --runs 15 --warmup 3 --time-budget-s 6
  bench lidar-default 70 --config default --points 120000 30000 --precision fp16 fp32 "${BOTH[@]}" \
    --runs 15 --warmup 3 --time-budget-s 8
  bench compile 55 --config small --points 120000 --precision fp16 --compile --runs 20 --warmup 3 \
    --time-budget-s 45
  bench tf32 25 --config small default --points 120000 --precision fp32 --tf32 --runs 15 --warmup 3 \
    --time-budget-s 6
fi
report
rc=$?
rm -rf "$WORK"
echo "== done in $((SECONDS - START))s: $OUTDIR/gpu_check.md"
cat "$OUTDIR/gpu_check.md"
exec >&- 2>&-
wait "$TEE"  # the log and the caller's output end complete
exit $rc
