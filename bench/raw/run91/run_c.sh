#!/usr/bin/env bash
# run 91, third call: the README's M = 1 and M = 16 cells with PDL. verify-runtime --bench (bench_w4a8.py: odd-shape
# checks, then every GPT-OSS shape, FP16 / W4A8 / W4A16, error beside every timing) at M = 1 and 16, group 64 and
# per channel, fp16; then bench_split_k.py with bf16 activations at M = 1, 16 (group 64, per channel): the bf16
# cells and PDL / plain in bf16.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
for m in 1 16; do for g in 64 channel; do
  echo "=== verify-runtime --bench M=$m group $g ($(date -u +%T))"
  timeout 100 python3 bench/bench_w4a8.py --M $m --backends fp16,w4a8,w4a16 --group $g --out "$OUT/bench_m${m}_$g.json" \
    > /tmp/b_${m}_$g.txt 2> /tmp/b.err || tail -5 /tmp/b.err
  grep -i "check\|q_proj\|k_proj\|o_proj\|gate_up\|down\|target" /tmp/b_${m}_$g.txt | grep -v "^\s*$" | head -14
done; done
for g in 64 channel; do
  echo "=== split-K/PDL bf16 group $g ($(date -u +%T))"
  timeout 100 python3 bench/bench_split_k.py --M 1,16 --dtype bf16 --group $g --rounds 2 --out "$OUT/split_bf16_$g.json" \
    2> /tmp/s.err | grep -v "^\s*$" | tail -11 || tail -5 /tmp/s.err
done
echo "=== done ($(date -u +%T))"
