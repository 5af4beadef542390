#!/usr/bin/env python3
"""Where an eager (no CUDA graph) int4_linear call spends its CPU time, beside FP16 nn.Linear.

On the GPU the kernels take 7-60 us (graph timing); called from Python each int4 call costs more
than that on the CPU, so eager use is launch-bound. This times N back-to-back calls per case on
the host clock (the GPU queue never drains: the CPU is the bottleneck), then runs the same loop
under cProfile and prints the functions with the most own time.

  python bench/bench_int4_eager.py --out bench/raw/runN/eager.json
"""
import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss as c  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("bench_int4_eager: needs a CUDA GPU", file=sys.stderr)
        return 3
    dev = torch.device("cuda")
    k, n = 2880, 5760   # experts.gate_up
    gen = torch.Generator(device=dev).manual_seed(0)
    q, ws = c._random_int4_weights(n, k, 64, gen, dev)
    wp = c.pack_int4(q)
    qc, wsc = c._random_int4_weights(n, k, None, gen, dev)
    wpc = c.pack_int4(qc)
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.float16)
    report = {"env": c.runtime_environment(), "shape": "experts.gate_up 2880 -> 5760", "calls": args.calls, "cases": []}
    for m in (16, 1024):
        x = torch.randn(m, k, generator=gen, device=dev).half()
        cases = {"fp16 nn.Linear": lambda: lin(x),
                 "W4A8 g64": lambda: c.int4_linear(x, wp, ws, act="a8"),
                 "W4A8 per channel": lambda: c.int4_linear(x, wpc, wsc, act="a8"),
                 "W4A16 g64": lambda: c.int4_linear(x, wp, ws, act="a16")}
        for label, fn in cases.items():
            with torch.no_grad():
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                cpu = (time.perf_counter() - t0) / args.calls * 1e6
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / args.calls * 1e6
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.calls):
                    fn()
                prof.disable()
                torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
            report["cases"].append({"M": m, "label": label, "cpu_us_per_call": cpu, "wall_us_per_call": wall,
                                    "profile_top": buf.getvalue()})
            print(f"M={m:<5} {label:<18} CPU {cpu:6.1f} us/call, until the GPU is done {wall:6.1f} us/call", flush=True)
            if label != "fp16 nn.Linear":
                print("\n".join(buf.getvalue().splitlines()[6:22]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
