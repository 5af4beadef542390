#!/usr/bin/env python3
"""int4_moe (every routed expert of a GPT-OSS MoE layer in one launch) against transformers'
BF16 path for the same experts (torch._grouped_mm), side by side in one process: its two ways
of reading the weights (unpacked in registers per row block, or unpacked once per call into
codes) and tile alternatives. gpt-oss-20b's 32 experts (--experts 128: 120b's), gate_up
(2880 -> 5760) and down (2880 -> 2880), group 64, tokens routed top-4 at random, at several
prompt lengths. CUDA events around 5 calls back to back (the host builds the row-block table per
call, so no CUDA graph; back to back, the host's work of one call overlaps the GPU's of the one
before, as in a model's forward), median of 20 after 5 warm-ups, per call. Every int4 timing
comes with its worst per-expert relative error against float64.

  python bench/bench_moe.py [--tokens 1,128,2048] [--experts 32] [--acts a8,a16] [--sweep] [--out res.json]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss as c  # noqa: E402
from bench_hessian_matmul import median_us  # noqa: E402  (CUDA events, warm-up, median)

# (BLOCK_M, BLOCK_N, warps, stages); the defaults are in int4_moe
SWEEP = [(16, 128, 4, None), (32, 128, 4, None), (64, 128, 4, None), (64, 128, 8, None), (128, 64, 4, None),
         (128, 128, 8, None), (16, 64, 4, None), (64, 64, 4, None)]
CODES_SWEEP = [(128, 128, 8, 4), (128, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (64, 64, 4, 3),
               (32, 64, 4, 4)]
BACK_TO_BACK = 5


def per_call_us(fn) -> float:
    def calls():
        for _ in range(BACK_TO_BACK):
            fn()
    return median_us(calls, iters=20) / BACK_TO_BACK


def main():
    import torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,128,2048")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--acts", default="a8", help="a8 and/or a16")
    ap.add_argument("--sweep", nargs="?", const="both", choices=["both", "registers", "codes"],
                    help="time tile / unpack alternatives of one path or both")
    ap.add_argument("--out")
    a = ap.parse_args()
    g, gd = torch.Generator().manual_seed(0), torch.Generator(device="cuda").manual_seed(0)
    k, res = 2880, []
    for name, n in (("gate_up", 5760), ("down", 2880)):
        layers = [c.random_int4_weights(n, k, 64, gd, "cuda", dtype=torch.bfloat16) for _ in range(a.experts)]
        wp = torch.stack([c.pack_int4(q) for q, _ in layers])
        ws = torch.stack([s for _, s in layers])
        dense = torch.stack([(q.float() * s.float().repeat_interleave(64, 1)).to(torch.bfloat16).T
                             for q, s in layers])          # [E, K, N] for grouped_mm
        del layers
        bias = (torch.randn(a.experts, n, generator=g) * 0.1).to(torch.bfloat16).cuda()
        for t in (int(x) for x in a.tokens.split(",")):
            top = torch.rand(t, a.experts, generator=g).topk(4, dim=-1).indices.flatten()
            counts = torch.bincount(top, minlength=a.experts).tolist()
            x = torch.randn(sum(counts), k, generator=g).to(torch.bfloat16).cuda()
            offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
            try:
                bf16 = per_call_us(lambda: torch._grouped_mm(x, dense, offs=offs))
            except Exception as e:   # an older torch, or a GPU without it: the int4 timings still count
                print(f"torch._grouped_mm: {e}", flush=True)
                bf16 = float("nan")
            row = {"proj": name, "tokens": t, "rows": sum(counts), "max_rows": max(counts), "bf16_grouped_mm_us": bf16}
            for act in a.acts.split(","):
                refs = c.int4_moe_reference(x, counts, wp, ws, bias, act=act)
                variants = [(None, None), (None, False), (None, True)] + (
                    [(tiles, False) for tiles in SWEEP if a.sweep in ("both", "registers")] +
                    [(tiles, True) for tiles in CODES_SWEEP if a.sweep in ("both", "codes")])
                for tiles, codes in variants:
                    label = f"{act} {'default' if codes is None else 'codes' if codes else 'registers'} {tiles or ''}"
                    y = c.int4_moe(x, counts, wp, ws, bias, act, tiles, codes)
                    err = max(c.relative_error(y[lo:hi], ref) for (lo, hi), ref in refs.items())
                    us = per_call_us(lambda: c.int4_moe(x, counts, wp, ws, bias, act, tiles, codes))
                    row[label.strip()] = {"us": us, "err": err, "x_bf16": bf16 / us}
                    print(f"{name} T={t} rows={sum(counts)} (max {max(counts)}/expert) int4_moe {label}: "
                          f"{us:.1f} us ({bf16 / us:.2f} x grouped_mm bf16 {bf16:.1f} us), max rel err {err:.2e}",
                          flush=True)
                del refs
            res.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
