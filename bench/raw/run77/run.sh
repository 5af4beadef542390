#!/usr/bin/env bash
# run 77: depth. A 12-layer checkpoint at gpt-oss-20b dimensions (half of 20b's 24 layers; 24 would need
# 13 + 42 + 12 GB of the 64 GB disk) through verify-runtime --model (eager and CUDA-graph decode,
# prefill 128) and bench_prefill --graph 8,64 (eager vs graph, logits compared step by step).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== 12 layers ($(date -u +%T))"
rm -f /tmp/gptoss-prefill/*.log
timeout 540 python3 bench/bench_prefill.py --layers 12 --scheme w4a8 --prefill 128 --new-tokens 16 --graph 8,64 \
  --experts 32 --out "$OUT/prefill_w4a8_32_12L.json" 2>&1 | grep "==\|tokens/s\||\|graph decode\|kernels:\|build" | tail -30
cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
df -h /tmp | tail -1
echo "=== done ($(date -u +%T))"
