#!/usr/bin/env python3
"""Large-M W4A8 with group scales: what the per-group fp32 rescale of the int8 dots costs.

The codes GEMM (int4_codes_gemm_kernel) with group scales waits for each group's int8 dot, then
turns it to fp32 and rescales it into the accumulator (wgmma.wait_group 0 in the sm_90 lowering).
This times, GEMM only, on int8 x_q and int8 codes already in memory, in one process:
  - int4_codes_gemm_kernel with group 64 over a few tiles, and per channel (no rescale: the bound);
    with --before PATH (an older compress_gptoss.py that has triton_kernels()) that version's kernel too;
  - a prototype of the same math whose operands come by TMA (host tensor descriptors), with and
    without the rescale. (Its warp-specialized form, tl.range(warp_specialize=True), never
    finished its first launch on the H200; it is in the kernel but not timed.)
  - FP16 / BF16 torch.matmul, and int4_linear's whole call (A8, group 64): the default (for fp16 x:
    q * scale, then cuBLAS) and the codes GEMM path forced by config, now and --before.
CUDA-graph time per call (as verify-runtime --bench); the GEMM-only rows come with their relative
error against float64 on the same integers.

  python bench/bench_group_rescale.py --out results/group_rescale.json [--before OLD.py]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss as c  # noqa: E402
from bench_large_m import load_module  # noqa: E402  (the bench folder is on sys.path: the script's own)

SHAPES = {"q_proj": (2880, 4096), "k/v_proj": (2880, 512), "o_proj": (4096, 2880),
          "experts.gate_up": (2880, 5760), "experts.down": (2880, 2880)}


def tma_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def group_gemm_tma(xd, qd, sx_ptr, ws_ptr, y_ptr, M, N, KP, stride_sn, stride_ym,
                       GROUP: tl.constexpr, RESCALE: tl.constexpr, WS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        pids_in_band = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // pids_in_band) * GROUP_M
        band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % pids_in_band) % band_m
        pid_n = (pid % pids_in_band) // band_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        s_ptrs = ws_ptr + tl.minimum(offs_n, N - 1) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32 if RESCALE else tl.int32)
        for k0 in tl.range(0, KP, GROUP, warp_specialize=WS):
            a = xd.load([pid_m * BLOCK_M, k0])
            b = qd.load([pid_n * BLOCK_N, k0])
            d = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
            if RESCALE:
                acc += d.to(tl.float32) * tl.load(s_ptrs + k0 // GROUP).to(tl.float32)[None, :]
            else:
                acc += d
        acc = acc.to(tl.float32)
        if not RESCALE:
            acc = acc * tl.load(s_ptrs).to(tl.float32)[None, :]
        acc = acc * tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])
    return group_gemm_tma


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", default="256,1024")
    ap.add_argument("--dtype", default="fp16,bf16")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--before", help="an older compress_gptoss.py (one with the public triton_kernels()) whose "
                    "codes GEMM and default call are timed too")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor
    if not torch.cuda.is_available():
        print("bench_group_rescale: needs a CUDA GPU", file=sys.stderr)
        return 3
    dev = torch.device("cuda")
    before = load_module(args.before, "compress_gptoss_before") if args.before else None
    kern = c.triton_kernels()["int4_codes_gemm"]
    proto = tma_kernel()
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []

    def timed(row, fn, copies, ref=None, out=None):
        try:
            row["us"] = round(c.time_graph_us(fn, copies, args.iters), 2)
            if ref is not None:
                fn(0)
                torch.cuda.synchronize()
                row["rel_err"] = float(c.relative_error(out[0] if isinstance(out, list) else out, ref))
        except Exception as e:   # a config that does not compile or launch is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    for dname in args.dtype.split(","):
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dname]
        for m in [int(v) for v in args.M.split(",")]:
            for shape, (k, n) in SHAPES.items():
                group, copies = 64, c.bench_copies(n * k)
                xq = torch.randint(-127, 128, (m, k), generator=gen, device=dev, dtype=torch.int8)
                sx = (torch.rand(m, generator=gen, device=dev) * 0.02 + 0.001)
                qs, ws = [], []
                for _ in range(copies):
                    q, s = c.random_int4_weights(n, k, group, gen, dev, dtype=dt)
                    qs.append(q.contiguous())
                    ws.append(s.contiguous())
                s_ch = [s[:, :1].contiguous() for s in ws]
                xd64 = xq.double()
                ref = ((xd64.view(m, k // group, group).transpose(0, 1) @ qs[0].double().view(n, k // group, group)
                        .permute(1, 2, 0)) * ws[0].double().t()[:, None, :]).sum(0) * sx.double()[:, None]
                ref_ch = (xd64 @ qs[0].double().t()) * s_ch[0].double().t() * sx.double()[:, None]
                y = torch.empty(m, n, device=dev, dtype=dt)
                base = dict(dtype=dname, M=m, shape=shape, K=k, N=n)

                kernels = [("now", kern)] + ([("before", before.triton_kernels()["int4_codes_gemm"])] if before else [])
                for when, kn in kernels:
                    tiles = ((64, 128, 4, 4), (128, 128, 8, 3)) + (((128, 256, 8, 3),) if when == "now" else ())
                    for bm, bn, w, st in tiles:
                        grid = (-(-m // bm) * -(-n // bn),)
                        for grp in ((group, 0) if when == "now" else (group,)):
                            scales = ws if grp else s_ch

                            def run(i, kn=kn, bm=bm, bn=bn, w=w, st=st, grid=grid, grp=grp, scales=scales):
                                kn[grid](xq, sx, qs[i], scales[i], y, y, y, m, n, k, k, k, k, scales[i].stride(0), n,
                                         A8=True, GROUP=grp, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=group,
                                         GROUP_M=8, num_warps=w, num_stages=st)
                            timed(dict(base, kernel=f"codes GEMM ({when})", group=grp or "channel",
                                       tile=f"{bm}x{bn}x{group} w{w} s{st}"), run, copies, ref if grp else ref_ch, y)

                # TMA operands, no warp specialization (with warp_specialize=True the first launch
                # never finished on the H200: not timed)
                bm, bn, w, st = 128, 128, 8, 3
                grid = (-(-m // bm) * -(-n // bn),)
                xdesc = TensorDescriptor.from_tensor(xq, [bm, group])
                qdescs = [TensorDescriptor.from_tensor(q, [bn, group]) for q in qs]
                for rescale in (True, False):
                    scales = ws if rescale else s_ch

                    def run(i, rescale=rescale, scales=scales):
                        proto[grid](xdesc, qdescs[i], sx, scales[i], y, m, n, k, scales[i].stride(0), n,
                                    GROUP=group, RESCALE=rescale, WS=False, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8,
                                    num_warps=w, num_stages=st)
                    timed(dict(base, kernel="TMA (cvt)", group=group if rescale else "channel",
                               tile=f"{bm}x{bn}x64 w{w} s{st}"), run, copies, ref if rescale else ref_ch, y)

                x = (xq.to(torch.float32) * sx[:, None]).to(dt)
                wd = [(q.to(torch.float32) * s.float().repeat_interleave(group, 1)).to(dt) for q, s in zip(qs, ws)]
                timed(dict(base, kernel=f"{dname.upper()} torch.matmul"), lambda i: torch.matmul(x, wd[i].t()), copies)
                packed = [c.pack_int4(q) for q in qs]
                C = c.Int4GemmConfig
                calls = [("now", c, None), ("now", c, C(64, 128, 64, False, 4, 4, codes=True)),
                         ("now", c, C(128, 128, 64, False, 8, 3, codes=True))] + ([("before", before, None)] if before else [])
                for when, mod, cfg in calls:
                    label = (cfg or mod.int4_gemm_config(m, n, k, c.sm_count(dev), False, "a8", dt == torch.bfloat16)).label()
                    timed(dict(base, kernel=f"int4_linear A8 g64, whole call ({when})", config=label,
                               default=cfg is None), lambda i, mod=mod, cfg=cfg: mod.int4_linear(x, packed[i], ws[i], act="a8", config=cfg),
                          copies)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                                              torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
