#!/usr/bin/env bash
# run 91, last call: int4_moe's DEQ (group-scaled weights as q * scale in fp16, one fp32 accumulator that Triton
# keeps in flight) against the int8 dots with a per-group rescale. The MoE GPU test (with DEQ), bench_moe.py
# (20b's 32 experts, A8, bf16 x and scales; each path with and without dequant, BF16 grouped_mm beside), then
# the whole 2-layer model's prefill with f6dac6a's code (no DEQ) between two runs of this one.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
echo "=== MoE GPU test ($(date -u +%T))"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "moe_kernel_on_the_gpu" 2>&1 | tail -2
echo "=== bench_moe ($(date -u +%T))"
timeout 150 python3 bench/bench_moe.py --tokens 16,128,512,1024,2048 --acts a8 --out "$OUT/moe_deq.json" 2>&1 \
  | grep "int4_moe" | sed 's/ (max .*expert)//' | cut -c1-150
echo "=== whole model prefill, before (f6dac6a, no DEQ) / now ($(date -u +%T))"
timeout 270 python3 bench/bench_prefill.py --layers 2 --scheme w4a8 --prefill 128,512,2048 --experts 32 \
  --before .ab/compress_gptoss_f6dac6a.py --out "$OUT/prefill_deq.json" 2>&1 | grep "==\|prefill\|kernels:" | tail -24
echo "=== done ($(date -u +%T))"
