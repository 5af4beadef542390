#!/usr/bin/env bash
# The CPU-machine part of run 92's two-GPU section: quantize on a 2-layer random GPT-OSS (hidden 1024,
# 32 experts, 422 MB of BF16) in one process, then under torchrun with 2 processes (gloo), each rank
# under cProfile (prof0.out, prof1.out in $W). Compare the log's "calibration:" -> "weights:" times.
set -euo pipefail
W=${W:-/tmp/dl}; PY=${PY:-.venv/bin/python}; mkdir -p $W
$PY - <<PY
import sys; sys.path.insert(0, "tests")
import tiny_gptoss as t
spec = t.TinySpec(**{**t.asdict(t.TinySpec()), "hidden": 1024, "intermediate": 1024, "experts": 32, "top_k": 4,
                    "heads": 16, "kv_heads": 4, "head_dim": 64, "vocab": 2048, "layers": 2, "train_steps": 0})
t.build_random("$W/mx", spec)
import json
open("$W/calib.jsonl", "w").write("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 20 + str(i)}) + "\n" for i in range(8)))
PY
$PY compress_gptoss.py dequantize --src $W/mx --dst $W/bf16 --overwrite
Q="compress_gptoss.py quantize --model-in $W/bf16 --experts w4a16 --mw w4a16 --calib-jsonl $W/calib.jsonl --num-calibration-samples 4 --max-seq-length 64 --no-eval --overwrite"
$PY $Q --output-dir $W/q1 2>&1 | grep "^\[gptoss"
cat > $W/prof.py <<PY
import cProfile, os, sys, runpy
sys.argv = sys.argv[1:]
cProfile.run("runpy.run_path(sys.argv[0], run_name='__main__')", f"$W/prof{os.environ.get('RANK')}.out")
PY
$PY -m torch.distributed.run --standalone --nproc_per_node 2 $W/prof.py $Q --output-dir $W/q2 2>&1 | grep "^\[gptoss"
$PY -c "import pstats; [pstats.Stats(f'$W/prof{r}.out').sort_stats('cumulative').print_stats('offload|share|broadcast|barrier', 12) for r in (0, 1)]"
