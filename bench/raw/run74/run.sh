#!/usr/bin/env bash
# run 74: eager int4_linear at M = 1, 16, 32, 64 (bench_int4_eager.py) beside 85adad7's code in the same
# process: the fused kernels' GPU time after row_scales reduces once (M = 16, 32: tensor cores; M = 1: the GEMV).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
timeout 270 python3 bench/bench_int4_eager.py --calls 700 --before .ab/compress_gptoss_85adad7.py --out "$OUT/eager.json" 2>&1 \
  | grep -A 200 "W4A8 at M <= 64" | tail -60
