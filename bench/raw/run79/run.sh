#!/usr/bin/env bash
# run 79: bf16 activations at M = 1 (verify-runtime --bench --dtype bf16, new): every GPT-OSS shape,
# group 64 and per channel, bf16 nn.Linear vs the built-in W4A8 / W4A16 (the M = 1 GEMV).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
for g in 64 channel; do
  echo "=== M = 1, bf16, group $g ($(date -u +%T))"
  timeout 80 python3 bench/bench_w4a8.py --M 1 --dtype bf16 --backends fp16,w4a8,w4a16 --group $g --iters 300 \
    --out "$OUT/w4a8_m1_bf16_$g.json" 2>&1 | grep -v "bench: " | tail -9
done
echo "=== done ($(date -u +%T))"
