#!/bin/bash
# run 92a: large-M W4A8 with group scales, GEMM only: the codes GEMM (cp.async) vs TMA and TMA +
# warp specialization, with and without the group rescale; FP16/BF16 and the default call beside them
set -x
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 bench/bench_group_rescale.py --M 1024 --out $OUT/group_rescale.json > $OUT/run92a.log 2>&1
echo rc=$?
tail -n 5 $OUT/run92a.log
