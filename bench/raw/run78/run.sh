#!/usr/bin/env bash
# run 78: gpt-oss-120b's expert count (128 experts, top-4) at 2 layers through verify-runtime --model
# (eager and CUDA-graph decode, prefill 128) and bench_prefill --graph 8,64.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== 120b experts, 2 layers ($(date -u +%T))"
rm -f /tmp/gptoss-prefill/*.log
timeout 420 python3 bench/bench_prefill.py --layers 2 --scheme w4a8 --prefill 128 --new-tokens 32 --graph 8,64 \
  --experts 128 --out "$OUT/prefill_w4a8_128.json" 2>&1 | grep "==\|tokens/s\||\|graph decode\|kernels:\|build" | tail -30
cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
echo "=== done ($(date -u +%T))"
