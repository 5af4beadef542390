#!/bin/bash
# run 92b: the group rescale's int32 -> fp32 by the magic number (add_scaled) against the code
# before it (cf8a8ea, carried as .ab/compress_gptoss_cf8a8ea.py), in the same processes. The change
# timed as "now" is magic_add_scaled.diff beside this script (applied to cf8a8ea, then reverted)
set -x
OLD=.ab/compress_gptoss_cf8a8ea.py
python3 bench/bench_group_rescale.py --M 256,1024 --before $OLD --out $OUT/group_rescale.json > $OUT/run92b_rescale.log 2>&1
echo rc=$?
# MoE experts (A8, group 64), new / old / new: bench_moe imports the compress_gptoss beside its bench/ folder
mkdir -p /tmp/old/bench && cp $OLD /tmp/old/compress_gptoss.py && cp bench/bench_moe.py bench/bench_hessian_matmul.py /tmp/old/bench/
for who in new old new2; do
  if [ $who = old ]; then B=/tmp/old/bench; else B=bench; fi
  python3 $B/bench_moe.py --tokens 128,512,1024,2048 --acts a8 --out $OUT/moe_$who.json > $OUT/run92b_moe_$who.log 2>&1
  echo $who rc=$?
done
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "cuda_graph or same_bits or on_the_gpu or decode_steps" > $OUT/run92b_tests.log 2>&1
echo tests rc=$?; tail -n 3 $OUT/run92b_tests.log
