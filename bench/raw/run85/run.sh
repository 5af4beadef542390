#!/usr/bin/env bash
# run 85: trace the one-step jump between graph and eager decode (0.34 in run 73, 0.37 in run 76; 2 layers,
# 20b dims, W4A8): bench_prefill --graph 8,116 --routes --seeds 0,1,2,3,4,5,6,7 --repeats 3 records every router's top-4 experts per step in
# both modes (same tokens fed) and lists where they differ, with the eager run's 4th-vs-5th logit gap there.
# run 85: as run 84 (8 prompts x 116 steps), each prompt decoded 3 times eagerly and 3 times as graph replays, all fed the
# same tokens and compared with the first eager run: which mode a jump belongs to, and whether it recurs (run 84:
# a 0.34 jump at seed 2 step 38 with no expert flip).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== 2 layers ($(date -u +%T))"
timeout 500 python3 bench/bench_prefill.py --layers 2 --scheme w4a8 --prefill 128 --new-tokens 4 --graph 8,116 --routes --seeds 0,1,2,3,4,5,6,7 --repeats 3 \
  --experts 32 --out "$OUT/prefill_w4a8_32_2L_routes8x3.json" 2>&1 | grep "==\|tokens/s\||\|graph decode\|kernels:\|build\|failed\|Error" | grep -v "bf16.*graph decode: [0-9]" | tail -40
cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
echo "=== done ($(date -u +%T))"
