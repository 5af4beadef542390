#!/usr/bin/env bash
# run 88: the M = 16 config sweep (verify-runtime --bench --sweep) with split-K summed from slices, the default now
# everywhere except the explicit atomics variants: is run 87's retuned default still the fastest deterministic
# config per shape (the sweep also has 32-wide tiles and the planar kernel)? W4A8 g64 and per channel, fp16.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
for g in 64 channel; do
  echo "=== sweep M=16 group $g ($(date -u +%T))"
  timeout 250 python3 bench/bench_w4a8.py --M 16 --sweep --sweep-m 16 --backends fp16,w4a8 --group $g --no-check \
    --out "$OUT/sweep16_$g.json" > "$OUT/sweep16_$g.txt" 2> /tmp/sweep_$g.err || tail -5 /tmp/sweep_$g.err
  grep -i "sweep\|best\|default" "$OUT/sweep16_$g.txt" | head -30
done
echo "=== done ($(date -u +%T))"
