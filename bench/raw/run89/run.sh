#!/usr/bin/env bash
# run 89: k/v_proj-sized N at M <= 16 on 32-wide tiles (run 88's sweep: the fastest deterministic config there).
# bench_split_k.py at M = 16 (g64 and per channel, fp16: the new default against its atomics twin and half its
# split), the GPU tests of tests/test_kernels.py, and verify-runtime --bench at M = 16 (its odd-shape checks
# run the new tiles for A8 and A16, fp16 and bf16).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
for g in 64 channel; do
  echo "=== split-K M=16 group $g ($(date -u +%T))"
  timeout 80 python3 bench/bench_split_k.py --M 16 --group $g --act a8,a16 --rounds 2 --out "$OUT/split16_$g.json" 2> /tmp/s_$g.err || tail -5 /tmp/s_$g.err
done
echo "=== GPU kernel tests ($(date -u +%T))"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "same_bits or cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -1
echo "=== verify-runtime --bench M=16 ($(date -u +%T))"
timeout 150 python3 bench/bench_w4a8.py --M 16 --backends fp16,w4a8,w4a16 --group 64 --out "$OUT/bench16_g64.json" > "$OUT/bench16_g64.txt" 2> /tmp/b.err || tail -5 /tmp/b.err
grep -i "check\|k_proj\|target" "$OUT/bench16_g64.txt" | head -20
echo "=== done ($(date -u +%T))"
