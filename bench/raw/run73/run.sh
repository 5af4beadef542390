#!/usr/bin/env bash
# run 73: the fused activation quantization's absmax reduced once (row_scales), int4_moe's decode GEMV
# without split-K (the new default); the M = 1 sweep with group 64 (its F config is the fused one);
# the GPU tests; the whole 20b-dims model decoding in CUDA graphs.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
echo "=== sweep M = 1, group 64 ($(date -u +%T))"
timeout 120 python3 bench/bench_w4a8.py --M 1 --sweep --sweep-m 1 --backends fp16,w4a8 --group 64 \
  --iters 300 --out "$OUT/w4a8_m1_64.json" 2>&1 | grep -v "bench: sweep" | tail -8
echo "=== int4_moe at decode ($(date -u +%T))"
timeout 150 python3 bench/bench_launch.py --out "$OUT/launch.json" 2>&1 | grep "1 token\|host" | grep -v "GEMV (" | tail -30
echo "=== GPU tests ($(date -u +%T))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -3
echo "=== whole model ($(date -u +%T))"
PREFILL=128 PGRAPH=8,20 timeout 240 bash bench/run_h200.sh prefill 2>&1 | grep "==\|tokens/s\||" | tail -20
cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
echo "=== done ($(date -u +%T))"
