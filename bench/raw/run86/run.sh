#!/usr/bin/env bash
# run 86: split-K shares summed from per-split slices by default (split_stores=True) instead of fp32 atomics.
# 0) tests/test_kernels.py's GPU tests, with the new one (the same bits every call, eager and graph).
# 1) determinism: 2 layers at 20b dims, W4A8, 4 prompts x 116 steps, each decoded twice eagerly and twice as graph
#    replays, all fed the same tokens, compared with the first eager run (run 85, atomics: 5.6e-3 median between
#    two eager runs, 0.15-0.85 jumps at single steps).
# 2) speed: verify-runtime --bench at M = 1 and M = 16 (every GPT-OSS shape, W4A8 g64 vs FP16), this code and
#    24145b7's (atomics) alternating in one run: new, old, new.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== GPU kernel tests ($(date -u +%T))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "same_bits or cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -4
echo "=== determinism ($(date -u +%T))"
timeout 260 python3 bench/bench_prefill.py --layers 2 --scheme w4a8 --prefill 128 --new-tokens 4 --graph 8,116 --seeds 0,1,2,3 \
  --repeats 2 --experts 32 --out "$OUT/prefill_w4a8_32_2L_repeats.json" 2>&1 | grep "graph decode kernels\|graph decode:\|decode, CUDA\|failed\|Error" | cut -c1-250
i=0
gunzip -c .ab/compress_gptoss_24145b7.py.gz > /tmp/compress_gptoss_24145b7.py
for script in compress_gptoss.py /tmp/compress_gptoss_24145b7.py compress_gptoss.py; do
  for M in 1 16; do
    echo "=== $script M=$M ($(date -u +%T))"
    timeout 45 python3 $script verify-runtime --bench --shapes gpt-oss --M $M --backends fp16,w4a8 --group 64 --iters 100 \
      --json > "$OUT/bench_${i}_M${M}.json" 2> "$OUT/bench_${i}_M${M}.err" || tail -3 "$OUT/bench_${i}_M${M}.err"
  done
  i=$((i+1))
done
echo "=== done ($(date -u +%T))"
