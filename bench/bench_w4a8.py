#!/usr/bin/env python3
"""FP16 nn.Linear vs the W4A8/W4A16 GEMMs (built-in Triton, QQQ) on the GPT-OSS shapes.

A thin wrapper: the implementation is `compress_gptoss.py verify-runtime --bench` (sections 7 and 8), so
the CLI and this script cannot drift. It needs torch with CUDA and triton; not llmcompressor, not
compressed-tensors. On a GPU it first checks correctness on odd shapes, then times every backend
and shape (eager and CUDA graph), and prints a table with the speedup over fp16 and the relative
error against float64 beside every timing. QQQ runs in its own worker processes.

  python bench/bench_w4a8.py --out bench/h200.json                 # all GPT-OSS shapes, group 64
  python bench/bench_w4a8.py --group 32 --sweep --out bench/h200-g32.json
  python bench/bench_w4a8.py --M 16 --K 4096 --N 4096               # one shape (the seed's default)
  python bench/bench_w4a8.py --M 1 --sweep --sweep-m 1               # every shape at M = 1, + the M = 1 sweep

Every option of `verify-runtime --bench` works here (see `compress_gptoss.py verify-runtime -h`);
without --K/--N/--shapes it runs --shapes gpt-oss (at --M if given). Exit 3 without a GPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss  # noqa: E402


def main(argv: list[str]) -> int:
    if not any(a.split("=")[0] in ("--shapes", "--K", "--N") for a in argv):   # --M alone: every shape at M
        argv = ["--shapes", "gpt-oss"] + argv
    return compress_gptoss.main(["verify-runtime", "--bench"] + argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
