#!/usr/bin/env bash
# verify-runtime --model on the tiny W4A8 checkpoint (every Linear W4A8), the current code vs 2a1f1c2's, alternating
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for i in 1 2 3; do
  for v in before now; do
    f=compress_gptoss.py; [ $v = before ] && f=.ab/compress_gptoss_2a1f1c2.py
    python3 $f verify-runtime --model .tq/w4a8 --bf16 /nonexistent --new-tokens 64 --json > $OUT/vm_${v}_$i.json 2> $OUT/vm_${v}_$i.err || tail -5 $OUT/vm_${v}_$i.err
    python3 - $OUT/vm_${v}_$i.json $v $i <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[2], sys.argv[3], "kernels", r.get("kernels"), "tok/s quantized %.1f dense %.1f bf16 %.1f" % (
    r["quantized"]["tokens_per_s"], r["dense"]["tokens_per_s"], r["bf16_source"].get("tokens_per_s") or 0),
    "KL median %.1e top1 %.3f same greedy %s/%d" % (r["agreement"]["kl_median"], r["agreement"]["top1_agreement"],
                                                 r["same_greedy_tokens"], r["new_tokens"]), flush=True)
PY
  done
done
