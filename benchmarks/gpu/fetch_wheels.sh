#!/usr/bin/env bash
# Download, here (with network), what the GPU machine's image lacks for benchmarks/gpu/check.sh,
# as cp312 manylinux x86_64 wheels into .whl/ (git-ignored), plus the real SemanticKITTI scan as
# bench input (.whl/data/, from ../shared/data when present). The image (Python 3.12, CUDA torch,
# Triton, numpy, timm, ...: /work/.library/device/KINDS.md) lacks: spconv-triton, open_clip_torch
# (+ ftfy, wcwidth) and spconv's CPU build (+ cumm, pccm, ccimport, fire, termcolor, lark; the CPU
# reference of the cuda-vs-CPU test). About 7 MB: one device call carries it all.
#
#   benchmarks/gpu/fetch_wheels.sh            # spconv-triton as the CUDA backend: one call
#   benchmarks/gpu/fetch_wheels.sh --spconv   # also spconv-cu126 (70.5 MB) + cumm-cu126 (27.5 MB)
#
# --spconv: those two are over one call's 64 MiB together, so they travel in two calls. The
# spconv-cu126 wheel is split in two; .whl-stage1/ (git-ignored) gets cumm-cu126 and the first part
# (~61.5 MB), .whl/ the second part and the whole wheel's sha256. Call 1 carries .whl-stage1 and runs
# `bash benchmarks/gpu/check.sh --stage .whl-stage1` (parks them in /tmp/clip3d-wheels on the
# machine); call 2, within the machine's warm time (30 s), carries .whl and runs the check, which
# joins the parts, verifies the sha256 and installs spconv-cu126 instead of the CPU spconv.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SPCONV=0
[[ ${1:-} == --spconv ]] && SPCONV=1
DOWNLOAD=(-m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p .whl
rm -f .whl/*.whl .whl/*.part-* .whl/*.sha256
"$PY" "${DOWNLOAD[@]}" -d .whl spconv-triton==1.0.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
  pccm==0.4.16 ccimport==0.4.4 fire==0.7.1 termcolor==3.3.0 lark==1.3.1
if ((SPCONV)); then
  tmp=$(mktemp -d)
  "$PY" "${DOWNLOAD[@]}" -d "$tmp" spconv-cu126==2.3.8 cumm-cu126==0.7.11
  rm -rf .whl-stage1 && mkdir -p .whl-stage1
  mv "$tmp"/cumm_cu126-*.whl .whl-stage1/
  wheel=$(ls "$tmp"/spconv_cu126-*.whl)
  name=$(basename "$wheel")
  sha256sum <"$wheel" | cut -d' ' -f1 >".whl/$name.sha256"
  split -b 34000000 -a 2 "$wheel" "$tmp/$name.part-"  # part-aa (34 MB), part-ab (the rest)
  mv "$tmp/$name.part-aa" .whl-stage1/
  mv "$tmp/$name.part-ab" .whl/
  rm -rf "$tmp"
else
  "$PY" "${DOWNLOAD[@]}" -d .whl spconv==2.3.8 cumm==0.7.11  # the CPU build (reference, 4 MB)
  rm -rf .whl-stage1
fi
scan=${CLIP3D_SHARED_DATA:-../shared/data}/semantickitti_scan/000000.bin
if [[ -f $scan ]]; then
  mkdir -p .whl/data/semantickitti_scan && cp "$scan" .whl/data/semantickitti_scan/
fi
du -sh .whl .whl-stage1 2>/dev/null || true
ls -l .whl
