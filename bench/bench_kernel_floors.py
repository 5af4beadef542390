#!/usr/bin/env python3
"""How fast can an int4 GEMM at M <= 16 be on this GPU? Floors beside FP16, in one process.

For every GPT-OSS Linear shape at M = 1 and 16, CUDA-graph time per call (GPU time only, weights
cycled over copies totalling 3x L2, as `verify-runtime --bench`) of:
  fp16      nn.Linear (cuBLAS), the baseline of the issue's 3x target
  null      an empty Triton kernel: what one launch costs inside a graph
  read      a Triton kernel that only reads the int4 weights (xor, no math), best of a grid of
            tile widths and K splits: the memory floor of any int4 GEMM with this kind of grid
  rows      the per-token int8 activation quantization kernel alone (W4A8's first launch)
  a8        the default built-in W4A8 (int4_gemm_config's pick), rows included
  a8_planar the planar kernel (int4_planar weights, made before timing) at its --config, rows included
and the speedups over fp16 that each floor allows (fp16 / floor). Needs a CUDA GPU and triton.

  python bench/bench_kernel_floors.py --out results/floors.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss as cg  # noqa: E402


def timed(fn, copies: int) -> float:
    import torch
    with torch.no_grad():
        return cg.time_graph_us(fn, copies, 200)


def read_floor_us(wps, n: int, kw: int) -> tuple[float, str]:
    import torch
    kern = cg.triton_kernels()["int4_read_floor"]
    out = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    best = (float("inf"), "")
    for bn in (32, 64, 128):
        for split in (1, 2, 4, 8, 16):
            grid = (-(-n // bn), split)

            def fn(i, bn=bn, split=split, grid=grid):
                kern[grid](wps[i], out, n, kw, wps[i].stride(0), BLOCK_N=bn, SPLIT_K=split, num_warps=4)
            best = min(best, (timed(fn, len(wps)), f"n{bn}x{split}"))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--M", default="1,16", help="comma list of M (default: %(default)s)")
    ap.add_argument("--planar", default="16,64,256,0,4,1,1,4,1,1",
                    help="planar config: block_m,block_n,k_per_iter,fuse,warps,stages,group_m,split_k,prefetch,w_lhs")
    ap.add_argument("--out")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("bench_kernel_floors: needs a CUDA GPU", file=sys.stderr)
        return 3
    f = [int(v) for v in a.planar.split(",")]
    planar_cfg = cg.Int4GemmConfig(f[0], f[1], f[2], bool(f[3]), f[4], f[5], f[6], f[7], prefetch=bool(f[8]),
                                   w_lhs=bool(f[9]), planar=True)
    kern = cg.triton_kernels()
    gen = torch.Generator(device="cuda").manual_seed(0)
    null_out = torch.empty(1, device="cuda")
    null_us = timed(lambda i: kern["null"][(1,)](null_out), 20)
    rows = []
    print(f"{torch.cuda.get_device_name()}; null launch in a graph: {null_us:.2f} us; planar config {planar_cfg.label()}")
    print(f"{'shape':<22}{'M':>4} {'fp16':>7} {'read':>7} {'GB/s':>6} {'rows':>6} {'a8':>7} {'planar':>7} "
          f"{'fp16/null':>9} {'fp16/read':>9} {'fp16/a8':>8} {'fp16/pl':>8}  read grid")
    for name, k, n in cg.GPT_OSS_SHAPES:
        q, ws = cg.random_int4_weights(n, k, a.group, gen, "cuda")
        wp = cg.pack_int4(q)
        copies = cg.bench_copies(wp.nbytes + ws.nbytes)
        wps = [wp] + [wp.clone() for _ in range(copies - 1)]
        wss = [ws] + [ws.clone() for _ in range(copies - 1)]
        planars = [cg.int4_planar(w, k) for w in wps]
        lin = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
               for _ in range(cg.bench_copies(n * k * 2))]
        read_us, grid = read_floor_us(wps, n, wp.shape[1])
        for m in [int(v) for v in a.M.split(",")]:
            x = torch.randn(m, k, generator=gen, device="cuda").to(torch.float16)
            xq = torch.empty(m, -(-k // 256) * 256, dtype=torch.int8, device="cuda")
            sx = torch.empty(m, dtype=torch.float32, device="cuda")
            plan = cg.int4_plan(m, n, k, ws.shape[1], "a8", torch.float16, x.device, planar_cfg)
            ref = cg.int4_linear_reference(x, wp, ws, act="a8")
            err = cg.relative_error(cg.int4_linear(x, wp, ws, act="a8", config=planar_cfg, planar=planars[0]), ref)
            r = {"shape": name, "K": k, "N": n, "M": m, "int4_bytes": wp.nbytes + ws.nbytes,
                 "fp16_us": timed(lambda i: lin[i % len(lin)](x), len(lin)),
                 "null_us": null_us, "read_us": read_us, "read_grid": grid,
                 "rows_us": timed(lambda i: kern["int8_rows"][(m,)](x, xq, sx, k, xq.shape[1], k, xq.shape[1],
                                                                   **plan.quant_consts), 20),
                 "a8_us": timed(lambda i: cg.int4_linear(x, wps[i], wss[i], act="a8"), copies),
                 "a8_planar_us": timed(lambda i: cg.int4_linear(x, wps[i], wss[i], act="a8", config=planar_cfg,
                                                                 planar=planars[i]), copies),
                 "a8_planar_rel_err": err}
            rows.append(r)
            print(f"{name:<22}{m:>4} {r['fp16_us']:>7.2f} {read_us:>7.2f} {r['int4_bytes'] / read_us / 1e3:>6.0f} "
                  f"{r['rows_us']:>6.2f} {r['a8_us']:>7.2f} {r['a8_planar_us']:>7.2f} {r['fp16_us'] / null_us:>9.1f} "
                  f"{r['fp16_us'] / read_us:>9.1f} {r['fp16_us'] / r['a8_us']:>8.2f} {r['fp16_us'] / r['a8_planar_us']:>8.2f}"
                  f"  {grid}  (planar err {err:.1e})")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                                           "gpu": torch.cuda.get_device_name(), "group": a.group,
                                           "planar_config": planar_cfg.label(), "null_us": null_us,
                                           "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
