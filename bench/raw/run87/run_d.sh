#!/usr/bin/env bash
# run 87, fourth call: the GPU tests outside tests/test_kernels.py on the final code (test_graph_decode.py with the
# tiny fixture carried in .tiny, test_dequantize's GPU decode, test_quantize's tensor-core Hessians), and
# bench_split_k.py for per-channel W4A8 with bf16 activations at M = 16 and 64 (the README's last M = 16 cell).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== split-K channel a8 bf16 ($(date -u +%T))"
timeout 80 python3 bench/bench_split_k.py --M 16,64 --group channel --dtype bf16 --rounds 2 --out "$OUT/split_ch_bf16.json" 2> /tmp/split_d.err || tail -5 /tmp/split_d.err
echo "=== GPU tests ($(date -u +%T))"
GPTOSS_TINY_CACHE=$PWD/.tiny timeout 400 python3 -m pytest -v -p no:cacheprovider tests/test_graph_decode.py \
  tests/test_dequantize.py::test_gpu_decode_matches_cpu tests/test_quantize.py::test_tensor_core_hessians_equal_fp32_ones 2>&1 \
  | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed" | cut -c1-160
echo "=== done ($(date -u +%T))"
