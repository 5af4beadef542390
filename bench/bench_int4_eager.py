#!/usr/bin/env python3
"""Where an eager (no CUDA graph) int4_linear call spends its CPU time, beside FP16 nn.Linear.

On the GPU the kernels take 7-60 us (graph timing); called from Python each int4 call costs more
than that on the CPU, so eager use is launch-bound. This times N back-to-back calls per case on
the host clock (the GPU queue never drains: the CPU is the bottleneck), then runs the same loop
under cProfile and prints the functions with the most own time.

Then, on every GPT-OSS shape at M = 1, 16, 32 and 64, W4A8 with the activation quantization in its
own launch (what a CUDA graph gets) vs fused into the GEMM (one launch, what an eager call gets at
M <= 32) vs config=None (the rule itself): eager time per call (host clock, until the GPU is done)
and CUDA-graph time, side by side, each with its error against float64; each launched plainly too
("no PDL": without programmatic dependent launch, which the defaults use on sm_90+).

  python bench/bench_int4_eager.py --out results/eager.json
"""
import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss as c  # noqa: E402
from bench_large_m import load_module  # noqa: E402   (this folder is on sys.path: the script's own)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--before", help="an older compress_gptoss.py whose fused kernel is timed too")
    ap.add_argument("--M", default="1,16,32,64", help="row counts of the side-by-side part (default 1,16,32,64)")
    ap.add_argument("--skip-profile", action="store_true", help="only the side-by-side part")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("bench_int4_eager: needs a CUDA GPU", file=sys.stderr)
        return 3
    dev = torch.device("cuda")
    k, n = 2880, 5760   # experts.gate_up
    gen = torch.Generator(device=dev).manual_seed(0)
    q, ws = c.random_int4_weights(n, k, 64, gen, dev)
    wp = c.pack_int4(q)
    qc, wsc = c.random_int4_weights(n, k, None, gen, dev)
    wpc = c.pack_int4(qc)
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.float16)
    report = {"env": c.runtime_environment(), "shape": "experts.gate_up 2880 -> 5760", "calls": args.calls, "cases": []}
    for m in () if args.skip_profile else (16, 1024):
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
    before = load_module(args.before, "compress_gptoss_before") if args.before else None
    report["fused"] = fused_vs_two_launches(torch, dev, args.calls, before, [int(v) for v in args.M.split(",")])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def fused_vs_two_launches(torch, dev, calls: int, before=None, ms=(1, 16, 32, 64)) -> list:
    """Eager times interleaved (round r times every variant once, 7 rounds, median): the host
    clock on a shared machine drifts, so variants are compared within the same seconds."""
    from dataclasses import replace
    rows = []

    def eager_us(fns: dict) -> dict:
        for fn in fns.values():
            for _ in range(20):
                fn()
        per_batch = {label: [] for label in fns}
        for _ in range(7):
            for label, fn in fns.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(calls // 7):
                    fn()
                torch.cuda.synchronize()
                per_batch[label].append((time.perf_counter() - t0) / (calls // 7) * 1e6)
        return {label: statistics.median(v) for label, v in per_batch.items()}

    print("\nW4A8 at M <= 64: activation quantization in its own launch vs fused (one launch);"
          " 'default' = config=None, what an eager call gets", flush=True)
    for name, k, n in c.GPT_OSS_SHAPES:
        gen = torch.Generator(device=dev).manual_seed(k + n)
        lins = [torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.float16)
                for _ in range(c.bench_copies(n * k * 2))]
        layers = {g: c.random_int4_weights(n, k, None if g == "channel" else 64, gen, dev) for g in ("g64", "channel")}
        layers = {g: (c.pack_int4(q), ws) for g, (q, ws) in layers.items()}
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=dev).half()
            fns, graphs, cases = {"fp16 nn.Linear": lambda: lins[0](x)}, {}, {}
            with torch.no_grad():
                graphs["fp16 nn.Linear"] = c.time_graph_us(lambda i: lins[i](x), len(lins), 100)
                for g, (wp, ws) in layers.items():
                    copies = [(wp, ws)] + [(wp.clone(), ws.clone()) for _ in range(c.bench_copies(wp.nbytes + ws.nbytes) - 1)]
                    ref = c.int4_linear_reference(x, wp, ws, act="a8")
                    two = c.int4_gemm_config(m, n, k, per_channel=g == "channel", act="a8")
                    variants = [("two launches", c, two), ("fused", c, replace(two, fuse_act_quant=True)),
                                ("default", c, None), ("two launches no PDL", c, replace(two, pdl=False)),
                                ("fused no PDL", c, replace(two, fuse_act_quant=True, pdl=False))]
                    if before is not None:
                        old = before.int4_gemm_config(m, n, k, per_channel=g == "channel", act="a8")
                        variants.append(("fused before", before, replace(old, fuse_act_quant=True)))
                    for label, mod, cfg in variants:
                        key = f"W4A8 {g} {label}"
                        fns[key] = lambda mod=mod, cfg=cfg, wp=wp, ws=ws: mod.int4_linear(x, wp, ws, act="a8", config=cfg)
                        cases[key] = {"group": g, "variant": label, "config": cfg.label() if cfg else "None",
                                      "rel_err": c.relative_error(fns[key](), ref)}
                        graphs[key] = c.time_graph_us(
                            lambda i, mod=mod, cfg=cfg, copies=copies: mod.int4_linear(x, *copies[i], act="a8", config=cfg),
                            len(copies), 100)
                    del copies
                eager = eager_us(fns)
            for key in fns:
                row = {"shape": name, "M": m, **cases.get(key, {"variant": key}), "eager_us": eager[key],
                       "graph_us": graphs[key], "fp16_eager_us": eager["fp16 nn.Linear"],
                       "fp16_graph_us": graphs["fp16 nn.Linear"]}
                rows.append(row)
                err = f"  rel.err {row['rel_err']:.1e}" if "rel_err" in row else ""
                print(f"{name:<16} M={m:<3} {key:<24} eager {eager[key]:6.1f} us  graph {graphs[key]:6.1f} us{err}",
                      flush=True)
        del lins
    return rows


if __name__ == "__main__":
    sys.exit(main())
