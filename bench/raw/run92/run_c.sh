#!/usr/bin/env bash
# run 92c (LAYERS=1) and 92d (LAYERS=2 LIMIT=400), on the 2-GPU machine: quantize at gpt-oss-120b dimensions (1-2 layers, GPTQ W4A16, 128 x 2048
# calibration tokens, as run 9) in one process, then the same command under
# torchrun --nproc_per_node 2 (NCCL, one GPU per rank): wall time, pass times, peak memory, and the
# int4 codes of the two outputs compared.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L
echo "=== start $(date -u +%T)"
timeout ${LIMIT:-500} python3 bench/bench_quantize_scale.py --layers ${LAYERS:-1} --samples 128 --seq-len 2048 --compare-nproc 2 \
  --out "$OUT/quantize_nproc2_${LAYERS:-1}L.json" > "$OUT/run92c_${LAYERS:-1}L.log" 2>&1
echo "rc=$? end $(date -u +%T)"
grep -v "^\s*$" "$OUT/run92c_${LAYERS:-1}L.log" | grep -v "it/s\]\|s/it\]" | tail -n 60
