#!/usr/bin/env bash
# Everything that needs the GPU, in one device call (the lease is short; a fresh machine each
# time). Usage on the GPU box, from the repo root:  OUT=/some/dir bash bench/run_h200.sh [steps]
# steps: any of env tests decode qqq w4a8 large eager floors e2e marginal hessian hquality quantize prefill moe launch (default: env tests decode w4a8 e2e).
# qqq needs QQQ's source at $QQQ_SRC (no network there); quantize and prefill need llmcompressor importable.
# Figures land in $OUT as JSON. prefill: PLAYERS, PSCHEME, PEXPERTS, PREFILL, BEFORE, PPROFILE, PCHECK, PGRAPH (bench/bench_prefill.py);
# moe: MOE_TOKENS, MOE_EXPERTS, MOE_ACTS, SWEEP=both|registers|codes (see bench/bench_moe.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gptoss-out}
mkdir -p "$OUT"
steps=${*:-env tests decode w4a8 e2e}
QQQ_SRC=${QQQ_SRC:-.qqq}
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
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda_graph or on_the_gpu or decode_steps or stays_on_the_gpu" 2>&1 | tail -5
fi
if has decode; then
  step "MXFP4 decode, one 120b gate_up"
  python3 bench/bench_dequantize.py decode --out "$OUT/decode.json"
fi
if has qqq; then
  step "install-kernel from $QQQ_SRC"
  MAX_JOBS=16 python3 compress_gptoss.py install-kernel --source "$QQQ_SRC" --yes 2>&1 | tail -25
  export QQQ_SOURCE=$PWD/$QQQ_SRC   # QQQ installs only its extension; its Python files come from the source
fi
if has w4a8; then
  step "W4A8 / W4A16 GEMMs vs FP16"
  python3 bench/bench_w4a8.py ${SWEEP:+--sweep} --out "$OUT/w4a8.json" 2>&1 | grep -v "bench: sweep" | tail -90
fi
if has large; then
  step "W4A8 / W4A16 at M = 256, 1024: default kernel vs codes + GEMM (two launches) vs FP16${BEFORE:+, and the default of $BEFORE}"
  python3 bench/bench_large_m.py ${LARGE_M:+--M $LARGE_M} ${BEFORE:+--before $BEFORE} --out "$OUT/large_m.json" 2>&1 | tail -400
fi
if has eager; then
  step "int4_linear called eagerly (no CUDA graph): CPU cost per call; fused vs two-launch W4A8 at M = 1, 16, 32, 64"
  python3 bench/bench_int4_eager.py ${BEFORE:+--before $BEFORE} --out "$OUT/eager.json" 2>&1 | tail -400
fi
if has floors; then
  step "int4 GEMM floors at M <= 16: empty launch, weight read, activation rows, vs FP16"
  python3 bench/bench_kernel_floors.py ${PLANAR:+--planar $PLANAR} --out "$OUT/floors.json" 2>&1 | tail -20
fi
if has e2e; then
  step "dequantize end to end, 2 layers at 120b dims"
  python3 bench/bench_dequantize.py e2e --layers 2 --device cuda --with-transformers --work /tmp/gptoss-bench --out "$OUT/e2e_cuda.json"
fi
if has marginal; then
  step "dequantize end to end at 1 and 3 layers of 120b dims: per-layer cost vs disk, projected to 36"
  python3 bench/bench_dequantize.py marginal --layers 1,3 --device cuda --work /tmp/gptoss-bench --out "$OUT/marginal.json"
fi
if has hessian || has quantize || has prefill; then
  # llmcompressor and the packages the image lacks travel as wheels in .whl (no network there)
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c "import llmcompressor, compressed_tensors, datasets; print('llmcompressor', llmcompressor.__version__)"
fi
if has hessian; then
  step "GPTQ Hessian matmul: fp32 vs tensor cores"
  python3 -m pytest -q -p no:cacheprovider tests/test_quantize.py -k tensor_core_hessians 2>&1 | tail -3
  python3 bench/bench_hessian_matmul.py --out "$OUT/hessian_matmul.json"
fi
if has hquality; then
  step "tiny GPT-OSS, GPTQ W4A16 on the GPU: tensor-core vs fp32 Hessian matmuls, seeds 0 and 1"
  # .tiny: a copy of the test fixture (training it here would cost device time); else train one
  D=/tmp/hquality; rm -rf $D; mkdir -p $D
  if [ -d .tiny ]; then cp -r .tiny $D/mxfp4; else python3 tests/tiny_gptoss.py $D/mxfp4; fi
  python3 -c "import sys; sys.path.insert(0, 'tests'); import tiny_gptoss as t; t.corpus_jsonl('$D/calib.jsonl', 'train', 64); t.corpus_jsonl('$D/heldout.jsonl', 'heldout', 32)"
  python3 compress_gptoss.py dequantize --src $D/mxfp4 --dst $D/bf16 --dtype bf16 --overwrite > $D/deq.log 2>&1 || tail -5 $D/deq.log
  for v in "tc_seed0:--seed 0" "fp32_seed0:--seed 0 --fp32-hessian-matmul" "tc_seed1:--seed 1" "fp32_seed1:--seed 1 --fp32-hessian-matmul"; do
    name=${v%%:*}
    python3 compress_gptoss.py quantize --model-in $D/bf16 --experts w4a16 --mw w4a16 --calib-jsonl $D/calib.jsonl \
      --eval-jsonl $D/heldout.jsonl --num-calibration-samples 64 --max-seq-length 512 --output-dir $D/$name \
      --overwrite ${v#*:} > $D/$name.log 2>&1 || tail -5 $D/$name.log
    cp $D/$name/quality.json "$OUT/hquality_$name.json" 2>/dev/null
    python3 -c "import json; q = json.load(open('$D/$name/quality.json')); print('$name', 'KL', q['kl_mean'], 'top-1', q['top1_agreement'], 'tokens', q['heldout_tokens'])"
  done
fi
if has quantize; then
  step "quantize GPTQ W4A16, ${QLAYERS:-1} layer(s) at 120b dims"
  python3 bench/bench_quantize_scale.py --layers "${QLAYERS:-1}" --samples "${QSAMPLES:-64}" --seq-len "${QSEQ:-512}" \
    ${COMPARE:+--compare} ${QCAP:+--cap $QCAP} ${QBATCH:+--compare-batch $QBATCH} ${QMEM:+--max-cpu-memory $QMEM} ${QPROFILE:+--profile $OUT/quantize.prof} --out "$OUT/quantize_scale.json" 2>&1 | tail -60
fi
if has prefill; then
  step "a whole ${PSCHEME:-w4a8} checkpoint at gpt-oss dims, ${PEXPERTS:-32} experts (${PLAYERS:-2} layers): prefill and decode, kernels vs dense vs BF16"
  rm -f /tmp/gptoss-prefill/*.log   # only this step's logs go to $OUT
  python3 bench/bench_prefill.py --layers ${PLAYERS:-2} --scheme ${PSCHEME:-w4a8} --prefill ${PREFILL:-128,512,2048} ${BEFORE:+--before $BEFORE} ${PPROFILE:+--profile $PPROFILE} ${PCHECK:+--check $PCHECK} \
    ${PGRAPH:+--graph $PGRAPH} --experts ${PEXPERTS:-32} --out "$OUT/prefill_${PSCHEME:-w4a8}_${PEXPERTS:-32}.json" 2>&1 | tee "$OUT/prefill_${PSCHEME:-w4a8}_${PEXPERTS:-32}.log" | tail -60
  cp /tmp/gptoss-prefill/*.log "$OUT/" 2>/dev/null
fi
if has moe; then
  step "int4_moe (all routed experts in one launch) vs torch._grouped_mm BF16, ${MOE_EXPERTS:-32} experts${SWEEP:+, with the tile sweep}"
  python3 bench/bench_moe.py ${SWEEP:+--sweep $SWEEP} ${MOE_TOKENS:+--tokens $MOE_TOKENS} ${MOE_EXPERTS:+--experts $MOE_EXPERTS} \
    ${MOE_ACTS:+--acts $MOE_ACTS} --out "$OUT/moe${MOE_EXPERTS:+_$MOE_EXPERTS}${MOE_ACTS:+_${MOE_ACTS/,/_}}.json" 2>&1 | tail -400
fi
if has launch; then
  step "int4_moe at decode: host cost per call and per launch; the kernel's GPU time over tiles vs grouped_mm"
  python3 bench/bench_launch.py --out "$OUT/launch.json" 2>&1 | tail -40
fi
