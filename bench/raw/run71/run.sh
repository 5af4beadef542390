#!/usr/bin/env bash
# run 71: the M = 1 GEMV with its tile as [BLOCK_N, groups, words of a group] (one scale per group),
# swept again beside the tensor-core kernel and FP16; int4_moe's decode path (GEMV vs tensor cores);
# the GPU tests.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for g in 64 channel; do
  echo "=== sweep M = 1, group $g ($(date -u +%T))"
  timeout 200 python3 bench/bench_w4a8.py --M 1 --sweep --sweep-m 1 --backends fp16,w4a8,w4a16 --group $g \
    --iters 300 --out "$OUT/w4a8_m1_$g.json" 2>&1 | grep -v "bench: sweep" | tail -22
done
echo "=== int4_moe at decode ($(date -u +%T))"
timeout 150 python3 bench/bench_launch.py --out "$OUT/launch.json" 2>&1 | grep -v "BLOCK_N" | tail -40
echo "=== GPU tests ($(date -u +%T))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -4
echo "=== done ($(date -u +%T))"
