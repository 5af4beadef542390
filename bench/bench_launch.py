#!/usr/bin/env python3
"""GPU and host cost of int4_moe at decode. Host cost of one Triton launch at decode, where eager int4 calls are CPU-bound: the JIT path
(`kernel[grid](...)`: binder, cache key, globals check, launch metadata, launcher) against
launching the already compiled kernel directly (`compiled[grid](*args)`), for an empty kernel
and for int4_moe's kernel at one token (4 routed experts, gate_up), beside a whole int4_moe call
and torch ops. Host microseconds per call, 2000 calls back to back, then until the GPU is done.
Then the GPU time alone (CUDA graph, the row-block table fixed) of int4_moe's kernel at 1 and 4
tokens: int8_rows + kernel vs the kernel quantizing x itself (fused), and the kernel over tiles
(BLOCK_N, warps), beside torch._grouped_mm BF16 on the same experts; and the whole device-routed
int4_moe call (a decode step's) with tensor cores against the GEMV (int4_moe_gemv_kernel) over its tiles.

  python bench/bench_launch.py --out res.json
"""
import argparse
import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss as c  # noqa: E402


MOE_GEMV_TILES = [(32, 32, 4, 1), (32, 32, 4, 2), (32, 32, 4, 8), (64, 32, 4, 4), (64, 32, 4, 8), (16, 32, 4, 4),
                  (32, 64, 4, 4), (16, 64, 4, 8)]   # (BLOCK_N, BLOCK_W, warps, SPLIT_K)


def per_call_us(fn, calls: int) -> dict:
    import torch
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"host_us": host / calls * 1e6, "wall_us": wall / calls * 1e6}


def direct(kern, grid, *args, **kw):
    """(compiled kernel runner, its full argument list): what JITFunction.run launches with."""
    compiled = kern[grid](*args, **kw)
    grid = tuple(grid) + (1,) * (3 - len(grid))   # the compiled kernel's runner indexes all three
    bound = inspect.signature(kern.fn).bind(*args, **{k: v for k, v in kw.items() if k in kern.arg_names})
    bound.apply_defaults()
    return compiled[grid], list(bound.arguments.values())


def main() -> int:
    import torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    kern = c.triton_kernels()
    dev, rows = torch.device("cuda"), {}
    out = torch.zeros(1, device=dev, dtype=torch.int32)
    run, args = direct(kern["null"], (1,), out)
    rows["null kernel, JIT"] = per_call_us(lambda: kern["null"][(1,)](out), a.calls)
    rows["null kernel, compiled directly"] = per_call_us(lambda: run(*args), a.calls)
    rows["torch.empty + add_ (two torch ops)"] = per_call_us(lambda: torch.empty(8, device=dev).add_(1), a.calls)

    k, n, experts = 2880, 5760, 32
    gd = torch.Generator(device=dev).manual_seed(0)
    layers = [c.random_int4_weights(n, k, 64, gd, dev, dtype=torch.bfloat16) for _ in range(experts)]
    wp = torch.stack([c.pack_int4(q) for q, _ in layers])
    ws = torch.stack([s for _, s in layers])
    del layers
    counts = [0] * experts
    for e in (3, 9, 17, 30):
        counts[e] = 1
    x = torch.randn(4, k, device=dev).to(torch.bfloat16)
    rows["int4_moe call (A8, 1 token: int8_rows + moe kernel + table)"] = per_call_us(
        lambda: c.int4_moe(x, counts, wp, ws, None, "a8", fuse=False), a.calls)
    rows["int4_moe call (A8, 1 token: moe kernel quantizing x itself + table)"] = per_call_us(
        lambda: c.int4_moe(x, counts, wp, ws, None, "a8", fuse=True), a.calls)
    row_experts = torch.tensor([3, 9, 17, 30], device=dev)
    rows["int4_moe call (A8, 1 token: moe kernel quantizing x itself, rows' experts on the GPU, no table)"] = \
        per_call_us(lambda: c.int4_moe(x, None, wp, ws, None, "a8", row_experts=row_experts, gemv=False), a.calls)
    rows["int4_moe call (A8, 1 token: GEMV kernel quantizing x itself, rows' experts on the GPU; the default)"] = \
        per_call_us(lambda: c.int4_moe(x, None, wp, ws, None, "a8", row_experts=row_experts), a.calls)
    assert torch.equal(c.int4_moe(x, None, wp, ws, None, "a8", row_experts=row_experts, gemv=False),
                       c.int4_moe(x, counts, wp, ws, None, "a8", fuse=True)), "device-routed y differs"
    assert torch.equal(c.int4_moe(x, counts, wp, ws, None, "a8", fuse=True),
                       c.int4_moe(x, counts, wp, ws, None, "a8", fuse=False)), "fused x_q differs"
    quant = dict(c.row_quant_consts(k), PERM_KW=1)   # int8_rows_kernel's launch constants for K
    xa, sx = c.int8_rows(x, k, quant)
    y = torch.empty(4, n, device=dev, dtype=x.dtype)
    blk = torch.tensor([(e, i, i + 1) for i, e in enumerate((3, 9, 17, 30))], dtype=torch.int32, device=dev)
    margs = (xa, sx, wp, ws, wp, y, blk, wp, 0, 4, n, k, xa.stride(0), wp.stride(0), wp.stride(1), ws.stride(0),
             ws.stride(1), 0, y.stride(0))
    mkw = dict(A8=True, HAS_BIAS=False, GROUP=64, CHUNK=64, CODES=False, FUSE=False, FUSE_CHUNKS=1, ROW_EXPERTS=False,
               BLOCK_M=16, BLOCK_N=128, num_warps=4)
    grid = (4, -(-n // 128))
    run, args = direct(kern["int4_moe"], grid, *margs, **mkw)
    rows["int4_moe kernel, JIT"] = per_call_us(lambda: kern["int4_moe"][grid](*margs, **mkw), a.calls)
    rows["int4_moe kernel, compiled directly"] = per_call_us(lambda: run(*args), a.calls)
    y_jit = y.clone()
    run(*args)
    torch.cuda.synchronize()
    assert torch.equal(y, y_jit), "the direct launch computed something else"
    gpu = []
    for name, nn in (("gate_up", n), ("down", 2880)):
        wpn, wsn = (wp, ws) if nn == n else (wp[:, :nn].contiguous(), ws[:, :nn].contiguous())
        dense = torch.stack([(c.unpack_int4_packed(wpn[e], k).float() * wsn[e].float().repeat_interleave(64, 1))
                             .to(torch.bfloat16).T.contiguous() for e in range(experts)])
        for tokens in (1, 4):
            picks = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(tokens)).topk(4, -1).indices
            flat = picks.flatten().sort().values
            rows_e = flat.tolist()
            xr = torch.randn(len(rows_e), k, device=dev).to(torch.bfloat16)
            cnt = torch.bincount(flat, minlength=experts)
            offs = cnt.cumsum(0).to(torch.int32).to(dev)
            bf = c.time_graph_us(lambda i: torch._grouped_mm(xr, dense, offs=offs), 1, 200)
            xa, sx = c.int8_rows(xr, k, quant)
            yy = torch.empty(len(rows_e), nn, device=dev, dtype=torch.bfloat16)
            starts = [0] + cnt.cumsum(0).tolist()
            table = [(e, b, min(b + 16, starts[e + 1])) for e in range(experts) for b in range(starts[e], starts[e + 1], 16)]
            blk_t = torch.tensor(table, dtype=torch.int32, device=dev)
            ref = c.int4_moe(xr, cnt.tolist(), wpn, wsn, None, "a8", fuse=False)

            def kernel(xq, sq, bn=64, warps=4, fuse=False, fma=None):   # int4_moe's kernel alone, this table
                kern["int4_moe"][(len(table), -(-nn // bn))](
                    xq, sq, wpn, wsn, wpn, yy, blk_t, wpn, 0, len(rows_e), nn, k, xq.stride(0), wpn.stride(0), wpn.stride(1),
                    wsn.stride(0), wsn.stride(1), 0, yy.stride(0), **dict(mkw, BLOCK_N=bn, num_warps=warps, FUSE=fuse,
                    FUSE_CHUNKS=-(-k // 256) if fuse else 1), enable_fp_fusion=not fuse if fma is None else fma)
                return yy

            def moe(i, fuse, fma=None):   # the default tile (16, 64, 4): int8_rows + kernel, or the kernel on bf16 x
                return kernel(xr, xr, fuse=True) if fuse else kernel(*c.int8_rows(xr, k, quant), fma=fma)
            y_fused = moe(0, True).clone()
            print(f"fused == unfused: {torch.equal(y_fused, moe(0, False))}; fused == unfused compiled without FMA "
                  f"contraction: {torch.equal(y_fused, moe(0, False, fma=False))}", flush=True)
            for fuse in (False, True):
                us = c.time_graph_us(lambda i, fuse=fuse: moe(i, fuse), 1, 200)
                same = torch.equal(moe(0, fuse), ref)
                gpu.append({"proj": name, "tokens": tokens, "rows": len(rows_e), "block_n": 64, "warps": 4,
                            "fused": fuse, "us": us, "bf16_grouped_mm_us": bf, "same_as_int4_moe": same})
                print(f"GPU {name} {tokens} token(s): {'kernel quantizing x itself' if fuse else 'int8_rows + kernel'}"
                      f" (16, 64, 4) {us:6.1f} us, grouped_mm bf16 {bf:6.1f} us ({bf / us:.2f} x), same y: {same}",
                      flush=True)
            # the whole device-routed call (what a decode step runs), tensor cores vs the GEMV and its tiles
            row_e = flat.to(dev)
            for gemv, tiles in [(False, None), (True, None)] + [(True, t) for t in MOE_GEMV_TILES]:
                def call(i, gemv=gemv, tiles=tiles):
                    return c.int4_moe(xr, None, wpn, wsn, None, "a8", row_experts=row_e, gemv=gemv, tiles=tiles)
                us = c.time_graph_us(call, 1, 200)
                err = c.relative_error(call(0), ref.double())
                label = ("GEMV " + ("default " + str(c.MOE_GEMV_TILE) if tiles is None else str(tiles))
                         if gemv else "tensor cores (16-row tile)")
                gpu.append({"proj": name, "tokens": tokens, "rows": len(rows_e), "call": "int4_moe row_experts",
                            "gemv": gemv, "tiles": tiles, "us": us, "bf16_grouped_mm_us": bf, "rel_err_vs_int4_moe": err})
                print(f"GPU {name} {tokens} token(s) ({len(rows_e)} rows): int4_moe, rows' experts on the GPU, {label}"
                      f" {us:6.1f} us, grouped_mm bf16 {bf:6.1f} us ({bf / us:.2f} x), rel. diff to the table path {err:.1e}",
                      flush=True)
            for bn in (32, 64, 128):
                for warps in (2, 4):
                    def launch(i, bn=bn, warps=warps):
                        return kernel(xa, sx, bn, warps)
                    us = c.time_graph_us(launch, 1, 200)
                    same = torch.equal(launch(0), ref) or c.relative_error(launch(0), ref.double())
                    gpu.append({"proj": name, "tokens": tokens, "rows": len(rows_e), "block_n": bn, "warps": warps,
                                "us": us, "bf16_grouped_mm_us": bf, "same_as_int4_moe": same})
                    print(f"GPU {name} {tokens} token(s) ({len(rows_e)} rows): int4_moe kernel BLOCK_N {bn} warps {warps}"
                          f" {us:6.1f} us, grouped_mm bf16 {bf:6.1f} us ({bf / us:.2f} x), same y as int4_moe: {same}",
                          flush=True)
    for label, r in rows.items():
        print(f"{label:<64} host {r['host_us']:7.1f} us/call, until the GPU is done {r['wall_us']:7.1f}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"env": c.runtime_environment(), "calls": a.calls, "rows": rows, "gpu": gpu}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
