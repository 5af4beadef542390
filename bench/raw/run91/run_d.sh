#!/usr/bin/env bash
# run 91, fourth call: does programmatic dependent launch cost eager (no CUDA graph) calls anything? run 91c's
# verify-runtime --bench eager column was higher than run 89's for every backend, FP16 included (host clocks differ
# by machine). bench_int4_eager.py times, interleaved in one process, every W4A8 variant with and without PDL.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
echo "=== eager PDL vs plain ($(date -u +%T))"
timeout 420 python3 bench/bench_int4_eager.py --M 1,16 --skip-profile --calls 1400 --out "$OUT/eager_pdl.json" 2>/tmp/e.err \
  | grep -v "^\s*$" | tail -130 || tail -5 /tmp/e.err
echo "=== done ($(date -u +%T))"
# then (run91e.log), after PDL was dropped for the fused plans (eager calls): tests/test_kernels.py's GPU tests,
#   python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "pdl or same_bits or cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu"
# and (run91f.log), after verify-runtime started naming PDL in the built-in backend's line:
#   python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "verify_runtime_reports or pdl"
#   python3 compress_gptoss.py verify-runtime | grep -i built-in
# and (run91h.log), after the review tidy 82f7a2b (PDL availability read from the bound gdc_wait):
#   python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "pdl or verify_runtime_reports or same_bits"
