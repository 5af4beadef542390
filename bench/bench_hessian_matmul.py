#!/usr/bin/env python3
"""GPTQ Hessian accumulation on the GPU: llmcompressor 0.14's fp32 matmul vs `quantize`'s default
(tensor-core matmul of the exact BF16 products, fp32 sums; compress_gptoss.tensor_core_hessians).

  python bench/bench_hessian_matmul.py [--tokens 2048] [--k 2880] [--calls 128] [--chunks 2048,256] [--out res.json]

One call = one calibration sample of --tokens tokens into a K x K Hessian (a gpt-oss expert's
down_proj at 2048 tokens: K = 2880), BF16 inputs. For each chunk size (tokens per
tensor-core matmul): the median time per call (CUDA events, after warm-up), the ratio to fp32, and
the Hessian's relative (Frobenius) difference from a float64 reference and from the fp32 one after
--calls samples of activations with outlier channels.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_us(fn, iters=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--k", type=int, default=2880)
    ap.add_argument("--calls", type=int, default=128)
    ap.add_argument("--chunks", default="2048,512,256", help="tokens per tensor-core matmul to compare")
    ap.add_argument("--out")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_hessian_matmul: needs a CUDA GPU")
    import compress_gptoss as cg
    import llmcompressor.modifiers.gptq.base as gptq_base
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian as fp32_accumulate
    dev, K = "cuda", a.k
    chunks = [int(c) for c in a.chunks.split(",")]
    fns = {"fp32": fp32_accumulate}
    for c in chunks:
        with cg.tensor_core_hessians(c):
            fns[f"tc{c}"] = gptq_base.accumulate_hessian
    g = torch.Generator(device=dev).manual_seed(0)
    scales = torch.exp(1.5 * torch.randn(K, generator=g, device=dev))
    linear = torch.nn.Linear(K, 8, bias=False, device=dev)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": a.tokens, "k": K,
           "calls": a.calls, "default_chunk": cg.HESSIAN_CHUNK_TOKENS}
    for dtype in (torch.bfloat16,):      # FP16 inputs keep llmcompressor's fp32 matmul
        dt = str(dtype).split(".")[1]
        x = (torch.randn(1, a.tokens, K, generator=g, device=dev) * scales).to(dtype)
        h, n = torch.zeros(K, K, device=dev), torch.zeros((), device=dev)
        r = {name: {"us": median_us(lambda: fn(x, linear, h, n))} for name, fn in fns.items()}
        hs = {name: (torch.zeros(K, K, device=dev), torch.zeros((), device=dev)) for name in fns}
        h64 = torch.zeros(K, K, device=dev, dtype=torch.float64)
        for _ in range(a.calls):
            x = (torch.randn(1, a.tokens, K, generator=g, device=dev) * scales).to(dtype)
            for name, fn in fns.items():
                fn(x, linear, *hs[name])
            x64 = x.reshape(-1, K).double()
            h64.addmm_(x64.t(), x64, alpha=2)
        rel = lambda u, v: float((u.double() - v.double()).norm() / v.double().norm())
        print(f"{res['gpu']}, {dt}: one {a.tokens} x {K} sample into a {K} x {K} Hessian; "
              f"relative difference (Frobenius) after {a.calls} samples")
        for name in fns:
            r[name].update(speedup=r["fp32"]["us"] / r[name]["us"], rel_vs_fp64=rel(hs[name][0], h64),
                           rel_vs_fp32=rel(hs[name][0], hs["fp32"][0]),
                           samples_equal=bool(torch.equal(hs[name][1], hs["fp32"][1])))
            print(f"  {name:>7}: {r[name]['us']:7.0f} us ({r[name]['speedup']:5.2f}x)  vs fp64 "
                  f"{r[name]['rel_vs_fp64']:.2e}  vs fp32 {r[name]['rel_vs_fp32']:.2e}  counts equal: {r[name]['samples_equal']}")
        res[dt] = r
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
