#!/usr/bin/env bash
# run 82: bf16 activations per channel at every GPT-OSS shape and M in {1, 16, 64, 256, 1024}
# (run 80 swept group 64 only), W4A8 and W4A16 against BF16 nn.Linear.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
timeout 250 python3 bench/bench_w4a8.py --dtype bf16 --backends fp16,w4a8,w4a16 --group channel --iters 200 \
  --out "$OUT/w4a8_bf16_channel.json" 2>&1 | grep -v "bench: " | tail -40
echo "=== done ($(date -u +%T))"
