#!/usr/bin/env bash
# run 75: the first GPU run of 333704d (gemv_tile refactor) and of graph decode in verify-runtime --model
# (static_cache_decode): the GPU tests (kernels + graph decode), the whole 20b-dims model through
# verify-runtime (now with a CUDA-graph decode row) and bench_prefill --graph, then the M = 1 sweep.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GPTOSS_TINY_CACHE=/tmp/tinycache
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== GPU tests ($(date -u +%T))"
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/test_graph_decode.py tests/test_kernels.py \
  -k "graph or cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -15
echo "=== whole model ($(date -u +%T))"
rm -f /tmp/gptoss-prefill/*.log
timeout 250 python3 bench/bench_prefill.py --layers 2 --scheme w4a8 --prefill 128 --graph 8,20 --experts 32 \
  --out "$OUT/prefill_w4a8_32.json" 2>&1 | grep "==\|tokens/s\||\|graph decode\|kernels:" | tail -24
cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
echo "=== sweep M = 1, group 64 ($(date -u +%T))"
timeout 110 python3 bench/bench_w4a8.py --M 1 --sweep --sweep-m 1 --backends fp16,w4a8 --group 64 \
  --iters 300 --out "$OUT/w4a8_m1_64.json" 2>&1 | grep -v "bench: sweep" | tail -10
echo "=== done ($(date -u +%T))"
