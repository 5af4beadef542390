#!/usr/bin/env bash
# run 91, second call: PDL inside a whole model. bench_prefill.py at gpt-oss-20b dimensions (2 layers, W4A8,
# RTN): verify-runtime --model with fef2e5e's compress_gptoss.py (no PDL; otherwise the same code) between two
# runs of this one, prefill 128 and graph decode; then tests/test_graph_decode.py (the whole-model same-bits
# test among them) with the tiny fixture carried in .tiny.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== whole model, before (fef2e5e, no PDL) / now ($(date -u +%T))"
rm -f /tmp/gptoss-prefill/*.log
timeout 330 python3 bench/bench_prefill.py --layers 2 --scheme w4a8 --prefill 128 --graph 8,64 --experts 32 \
  --before .ab/compress_gptoss_fef2e5e.py --out "$OUT/prefill_w4a8_pdl.json" 2>&1 | grep "==\|tokens/s\||\|graph decode\|kernels:" | tail -40
tar czf "$OUT/verify_logs.tgz" -C /tmp/gptoss-prefill $(cd /tmp/gptoss-prefill && ls *.log) 2>/dev/null
echo "=== GPU tests ($(date -u +%T))"
GPTOSS_TINY_CACHE=$PWD/.tiny timeout 220 python3 -m pytest -v -p no:cacheprovider tests/test_graph_decode.py 2>&1 \
  | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed" | cut -c1-160
echo "=== done ($(date -u +%T))"
