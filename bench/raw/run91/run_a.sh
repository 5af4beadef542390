#!/usr/bin/env bash
# run 91, first call: programmatic dependent launch (PDL) for the M <= 64 GEMMs. The GPU tests of
# tests/test_kernels.py (with the new test_pdl_gives_the_same_bits_as_plain_launches), then bench_split_k.py,
# whose variants now include the default launched plainly ("no PDL"), g64 A8 and A16 at M = 1, 16, 64
# and per channel A8 at M = 1, 16; 2 rounds, variant order flipped per round.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
echo "=== GPU kernel tests ($(date -u +%T))"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "pdl or same_bits or cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -4
echo "=== split-K/PDL g64 a8,a16 fp16 ($(date -u +%T))"
timeout 240 python3 bench/bench_split_k.py --M 1,16,64 --act a8,a16 --rounds 2 --out "$OUT/split_g64.json" 2> /tmp/sa.err | grep -v "^\s*$" | tail -16 || tail -5 /tmp/sa.err
echo "=== split-K/PDL channel a8 fp16 ($(date -u +%T))"
timeout 130 python3 bench/bench_split_k.py --M 1,16 --group channel --rounds 2 --out "$OUT/split_ch.json" 2> /tmp/sb.err | grep -v "^\s*$" | tail -11 || tail -5 /tmp/sb.err
echo "=== done ($(date -u +%T))"
