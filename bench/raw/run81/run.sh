#!/usr/bin/env bash
# run 81: depth 24 = gpt-oss-20b's real layer count, at its dimensions (random MXFP4 codes), W4A8 through
# verify-runtime --model (eager and CUDA-graph decode, prefill 128). --drop-source deletes the 13 GB MXFP4
# checkpoint once dequantized, so 42 GB BF16 + 12 GB W4A8 fit the 64 GB disk (all three did not: run 77).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
df -h /tmp | tail -1; free -g | head -2
echo "=== 24 layers ($(date -u +%T))"
rm -f /tmp/gptoss-prefill/*.log
timeout 560 python3 bench/bench_prefill.py --layers 24 --scheme w4a8 --prefill 128 --new-tokens 16 \
  --experts 32 --drop-source --out "$OUT/prefill_w4a8_32_24L.json" 2>&1 | grep "==\|tokens/s\||\|graph decode\|kernels:\|build\|failed\|Error" | tail -30
cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
du -sh /tmp/gptoss-prefill/* 2>/dev/null; df -h /tmp | tail -1
echo "=== done ($(date -u +%T))"
