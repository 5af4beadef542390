#!/usr/bin/env bash
# run 72: the M = 1 GEMV per channel as a [BLOCK_N, 1, BLOCK_W] tile, the new M = 1 defaults; int4_moe's
# decode GEMV with split-K over tiles; the GPU tests; a whole 20b-dims model decoding in CUDA graphs.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for g in 64 channel; do
  echo "=== sweep M = 1, group $g ($(date -u +%T))"
  timeout 200 python3 bench/bench_w4a8.py --M 1 --sweep --sweep-m 1 --backends fp16,w4a8,w4a16 --group $g \
    --iters 300 --out "$OUT/w4a8_m1_$g.json" 2>&1 | grep -v "bench: sweep" | tail -20
done
echo "=== int4_moe at decode ($(date -u +%T))"
timeout 150 python3 bench/bench_launch.py --out "$OUT/launch.json" 2>&1 | grep "int4_moe, rows\|host" | tail -50
echo "=== GPU tests ($(date -u +%T))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -4
echo "=== whole model ($(date -u +%T))"
PREFILL=128 PGRAPH=8,20 timeout 240 bash bench/run_h200.sh prefill 2>&1 | tail -30
echo "=== done ($(date -u +%T))"
