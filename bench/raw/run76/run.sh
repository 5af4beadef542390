#!/usr/bin/env bash
# run 76: the two GPU kernel tests run 75's time limit cut; the whole 20b-dims model (now with gpt-oss's
# sliding window of 128) through verify-runtime, 333704d + graph decode beside 32ed39c (before the
# gemv_tile refactor) in one run, and bench_prefill --graph 8,64; then int4_moe at decode (bench_launch).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== GPU tests ($(date -u +%T))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "moe_kernel_on_the_gpu or decode_steps" 2>&1 | tail -3
echo "=== whole model ($(date -u +%T))"
rm -f /tmp/gptoss-prefill/*.log
timeout 330 python3 bench/bench_prefill.py --layers 2 --scheme w4a8 --prefill 128 --graph 8,64 --experts 32 \
  --before .ab/compress_gptoss_32ed39c.py --out "$OUT/prefill_w4a8_32.json" 2>&1 | grep "==\|tokens/s\||\|graph decode\|kernels:" | tail -40
cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
echo "=== int4_moe at decode ($(date -u +%T))"
timeout 100 python3 bench/bench_launch.py --out "$OUT/launch.json" 2>&1 | grep "1 token\|host" | grep -v "GEMV (" | tail -30
echo "=== done ($(date -u +%T))"
