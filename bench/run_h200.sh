#!/usr/bin/env bash
# Everything that needs the GPU, in one device call (the lease is short; a fresh machine each
# time). Usage on the GPU box, from the repo root:  OUT=/some/dir bash bench/run_h200.sh [steps]
# steps: any of env tests decode w4a8 e2e (default: all). Figures land in $OUT as JSON.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}
mkdir -p "$OUT"
steps=${*:-env tests decode w4a8 e2e}
has() { [[ " $steps " == *" $1 "* ]]; }
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

if has env; then
  step env
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  df -h /tmp | tail -1
fi
if has tests; then
  step "GPU tests"
  python3 -m pytest -q -p no:cacheprovider tests/test_dequantize.py -k "gpu or triton or fast_path or random_codes" 2>&1 | tail -5
fi
if has decode; then
  step "MXFP4 decode, one 120b gate_up"
  python3 bench/bench_dequantize.py decode --out "$OUT/decode.json"
fi
if has w4a8; then
  step "W4A8 / W4A16 GEMMs vs FP16"
  python3 bench/bench_w4a8.py --out "$OUT/w4a8.json" 2>&1 | tail -60
fi
if has e2e; then
  step "dequantize end to end, 2 layers at 120b dims"
  python3 bench/bench_dequantize.py e2e --layers 2 --device cuda --with-transformers --work /tmp/gptoss-bench --out "$OUT/e2e_cuda.json"
fi
