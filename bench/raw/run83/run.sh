#!/usr/bin/env bash
# run 83: trace the one-step jump between graph and eager decode (0.34 in run 73, 0.37 in run 76; 2 layers,
# 20b dims, W4A8): bench_prefill --graph 8,64 --routes records every router's top-4 experts per step in
# both modes (same tokens fed) and lists where they differ, with the eager run's 4th-vs-5th logit gap there.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== 2 layers ($(date -u +%T))"
timeout 500 python3 bench/bench_prefill.py --layers 2 --scheme w4a8 --prefill 128 --new-tokens 16 --graph 8,64 --routes \
  --experts 32 --out "$OUT/prefill_w4a8_32_2L_routes.json" 2>&1 | grep "==\|tokens/s\||\|graph decode\|kernels:\|build\|failed\|Error" | tail -30
cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
echo "=== done ($(date -u +%T))"
