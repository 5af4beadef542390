#!/usr/bin/env bash
# run 87: (1) what the fixed-order split-K sum costs: bench_split_k.py, default configs (per-split slices) vs the
#    same configs with fp32 atomics vs half the split, at M = 1, 16, 64 on every GPT-OSS shape, W4A8 g64 fp16;
#    this checkout (slices summed with every load in flight: tl.static_range) and 461a2c3 (a loop of loads)
#    alternating in one run: new, old, new.
# (2) the GPU tests: tests/test_graph_decode.py (the tiny fixture carried in .tiny) and tests/test_kernels.py's.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c "import pyarrow, datasets, llmcompressor; print('pyarrow', pyarrow.__version__, 'datasets', datasets.__version__, 'llmcompressor', llmcompressor.__version__)"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
gunzip -c .ab/compress_gptoss_461a2c3.py.gz > /tmp/compress_gptoss_461a2c3.py
i=0
for impl in compress_gptoss.py /tmp/compress_gptoss_461a2c3.py compress_gptoss.py; do
  echo "=== split-K $impl ($(date -u +%T))"
  timeout 110 python3 bench/bench_split_k.py --impl $impl --M 1,16,64 --rounds 2 --out "$OUT/split_${i}.json" \
    2> "/tmp/split_${i}.err" || tail -5 "/tmp/split_${i}.err"
  i=$((i+1))
done
tar czf "$OUT/split_err.tgz" -C /tmp split_0.err split_1.err split_2.err 2>/dev/null
echo "=== GPU tests ($(date -u +%T))"
GPTOSS_TINY_CACHE=$PWD/.tiny timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_graph_decode.py tests/test_kernels.py \
  -k "same_bits or cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu or graph" -rs > "$OUT/tests.log" 2>&1
tail -8 "$OUT/tests.log"
echo "=== done ($(date -u +%T))"
