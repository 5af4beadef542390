#!/usr/bin/env bash
# run 80: bf16 activations at every GPT-OSS shape and M in {1, 16, 64, 256, 1024} (verify-runtime --bench
# --dtype bf16), W4A8 with group 64 against BF16 nn.Linear.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
timeout 170 python3 bench/bench_w4a8.py --dtype bf16 --backends fp16,w4a8 --group 64 --iters 200 \
  --out "$OUT/w4a8_bf16_64.json" 2>&1 | grep -v "bench: " | tail -32
