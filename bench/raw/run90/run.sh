#!/usr/bin/env bash
# run 90: the final M <= 32 rules with bf16 activations (g64 and per channel) and per channel fp16 at M = 32:
# bench_split_k.py, each default against its atomics twin and half / twice its split (2 rounds).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
for spec in "64 bf16 16,32" "channel bf16 16,32" "channel fp16 32"; do
  set -- $spec
  echo "=== split-K group $1 $2 M=$3 ($(date -u +%T))"
  timeout 75 python3 bench/bench_split_k.py --M $3 --group $1 --dtype $2 --rounds 2 --out "$OUT/split_${1}_${2}.json" 2> /tmp/s.err || tail -5 /tmp/s.err
done
echo "=== done ($(date -u +%T))"
