#!/usr/bin/env python3
"""W4A8 / W4A16 at large M (prefill: M = 256, 1024) on the GPT-OSS shapes, side by side in one
process: FP16 nn.Linear, the default built-in kernel, and the two-launch path of
`Int4GemmConfig(codes=True)` (int4 -> int8/fp16 codes in a scratch buffer, then a GEMM on plain
tiles) over a few tile shapes; plus its two launches alone and, per channel, cuBLAS's int8 GEMM
(torch._int_mm) on the same codes as a ceiling. With --before PATH (a copy of an older
compress_gptoss.py) that version's default kernel is timed in the same process too.

CUDA-graph time per call (weights cycled over 3x L2, as `verify-runtime --bench`), median; every
built-in timing comes with its relative error against float64 on the same quantized values.

  python bench/bench_large_m.py --out results/large_m.json [--before .ab/compress_gptoss.py]
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss as c  # noqa: E402

C = c.Int4GemmConfig
# codes GEMM tiles: BLOCK_K = k_per_iter per channel (the group size with group scales)
CODES_CONFIGS = [C(128, 128, 128, False, 8, 3, codes=True), C(128, 256, 128, False, 8, 3, codes=True),
                 C(256, 128, 128, False, 8, 3, codes=True), C(128, 128, 256, False, 8, 3, codes=True),
                 C(128, 256, 64, False, 8, 4, codes=True), C(128, 128, 128, False, 8, 4, codes=True),
                 C(128, 64, 128, False, 4, 4, codes=True), C(64, 64, 128, False, 4, 4, codes=True),
                 C(64, 64, 64, False, codes=True, dequant=True)]


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)   # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", default="256,1024")
    ap.add_argument("--groups", default="64,channel", help="comma list of 32/64/128/channel")
    ap.add_argument("--acts", default="a8,a16")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="x, scales and the dense baseline")
    ap.add_argument("--before", help="an older compress_gptoss.py whose default kernel is timed too")
    ap.add_argument("--defaults-only", action="store_true", help="time the default config only, no alternatives")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("bench_large_m: needs a CUDA GPU", file=sys.stderr)
        return 3
    before = load_module(args.before, "compress_gptoss_before") if args.before else None
    dev = torch.device("cuda")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    rows = []

    def timed(label, fn, copies, ref=None, **extra):
        try:
            with torch.no_grad():
                err = c.relative_error(fn(0), ref) if ref is not None else None
                us = c.time_graph_us(fn, copies, args.iters)
        except Exception as e:   # a config the GPU cannot run (shared memory): say so, go on
            rows.append({**extra, "label": label, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"  {label:<34} error {rows[-1]['error']}", flush=True)
            return {"graph_us": float("inf")}
        rows.append({**extra, "label": label, "graph_us": us, "rel_err": err})
        print(f"  {label:<34} {us:8.1f} us" + (f"  rel.err {err:.1e}" if err is not None else ""), flush=True)
        return rows[-1]

    for name, k, n in c.GPT_OSS_SHAPES:
        for m in [int(v) for v in args.M.split(",")]:
            gen = torch.Generator(device=dev).manual_seed(m + k + n)
            x = torch.randn(m, k, generator=gen, device=dev).to(dt)
            base = {"shape": name, "M": m, "K": k, "N": n, "dtype": args.dtype}
            print(f"{name} M={m} K={k} N={n}", flush=True)
            lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt)
            lins = [lin] + [torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt)
                            for _ in range(c.bench_copies(n * k * 2) - 1)]
            fp16 = timed(f"{args.dtype} nn.Linear", lambda i: lins[i](x), len(lins), **base, group=None, act=None)["graph_us"]
            del lins, lin
            for g in args.groups.split(","):
                group = None if g == "channel" else int(g)
                if group and k % group:
                    continue
                q, ws = c.random_int4_weights(n, k, group, gen, dev, dtype=dt)
                wp = c.pack_int4(q)
                copies = [(wp, ws)] + [(wp.clone(), ws.clone()) for _ in range(c.bench_copies(wp.nbytes + ws.nbytes) - 1)]
                for act in args.acts.split(","):
                    ref = c.int4_linear_reference(x, wp, ws, act=act)
                    tag = dict(base, group=g, act=act)
                    print(f" {act} g{g}", flush=True)
                    rs = []
                    if before is not None:
                        rs.append(timed("before: default", lambda i: before.int4_linear(x, *copies[i], act=act),
                                        len(copies), ref, **tag, config="before " + before.int4_gemm_config(m, n, k).label()))   # noqa: E501
                    default = c.int4_gemm_config(m, n, k, per_channel=group is None, act=act, bf16=args.dtype == "bf16")
                    rs.append(timed("default " + default.label(), lambda i: c.int4_linear(x, *copies[i], act=act),
                                    len(copies), ref, **tag, config="default " + default.label()))
                    for cfg in [] if args.defaults_only else CODES_CONFIGS:
                        rs.append(timed("codes " + cfg.label(), lambda i, cfg=cfg: c.int4_linear(x, *copies[i], act=act, config=cfg),
                                        len(copies), ref, **tag, config=cfg.label()))
                    # the codes launch alone, and cuBLAS on the same operands (ceilings, not runtimes)
                    kern = c.triton_kernels()
                    kp = -(-k // 64) * 64
                    grid = (-(-n // 32), -(-kp // 512))
                    for scaled in () if args.defaults_only else (False, True):
                        codes = torch.empty(n, kp, device=dev, dtype=torch.int8 if act == "a8" and not scaled else torch.float16)

                        def launch(i, codes=codes, scaled=scaled):
                            wpi, wsi = copies[i]
                            kern["int4_codes"][grid](wpi, wsi, codes, n, k, wpi.shape[1], kp, wpi.stride(0), wsi.stride(0),
                                                     GROUP=group or 0, SCALED=scaled, BLOCK_N=32, BLOCK_W=64)
                            return codes
                        timed(f"  codes kernel alone{' (q * scale)' if scaled else ''}", launch, len(copies), **tag,
                              config="int4_codes" + ("_scaled" if scaled else ""))
                        launch(0)
                        if scaled:   # dequantized weights, then cuBLAS fp16 (A8: x_q as fp16, s_x after)
                            xq, sx = c.quantize_activations_int8(x)
                            xh = torch.nn.functional.pad(xq.half() if act == "a8" else x.half(), (0, kp - k))
                            timed("  cuBLAS fp16 on q * scale, GEMM only", lambda i: xh @ codes.T, 1, **tag,
                                  config="cublas_fp16_dequant")
                        elif act == "a8" and m > 16:
                            xq = torch.nn.functional.pad(c.quantize_activations_int8(x)[0], (0, kp - k))
                            timed("  cuBLAS torch._int_mm, GEMM only", lambda i: torch._int_mm(xq, codes.T), 1, **tag,
                                  config="torch._int_mm")
                    best = min(rs, key=lambda r: r["graph_us"])
                    print(f"  -> best {best['label']}: {fp16 / best['graph_us']:.2f}x fp16", flush=True)
                del copies
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": c.runtime_environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
