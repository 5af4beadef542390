#!/usr/bin/env bash
# run 87, third call: the new M <= 64 split rule (at most 12 groups of 64 per share) against its neighbours
# (half, twice) and fp32 atomics: bench_split_k.py, W4A8 g64 fp16 at M = 32, 64 (3 rounds); per channel A8 and
# A16 fp16, and g64 A8 bf16, at M = 64 (2 rounds); then tests/test_kernels.py's GPU tests on the new rule.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
echo "=== split-K g64 a8 fp16 ($(date -u +%T))"
timeout 100 python3 bench/bench_split_k.py --M 32,64 --rounds 3 --out "$OUT/split_m64_g64.json" 2> /tmp/split_a.err || tail -5 /tmp/split_a.err
echo "=== split-K channel a8,a16 fp16 ($(date -u +%T))"
timeout 80 python3 bench/bench_split_k.py --M 64 --group channel --act a8,a16 --rounds 2 --out "$OUT/split_m64_ch.json" 2> /tmp/split_b.err || tail -5 /tmp/split_b.err
echo "=== split-K g64 a8 bf16 ($(date -u +%T))"
timeout 60 python3 bench/bench_split_k.py --M 64 --dtype bf16 --rounds 2 --out "$OUT/split_m64_bf16.json" 2> /tmp/split_c.err || tail -5 /tmp/split_c.err
echo "=== GPU kernel tests ($(date -u +%T))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "same_bits or cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -1
echo "=== done ($(date -u +%T))"
