#!/usr/bin/env python3
"""EXPERIMENT (switches in the kernels exist only for this): W4A8 with group scales at large M,
the per-group fp32 rescale of each int32 dot. RESCALE 0: cvt.rn.f32.s32 then FMA (the kernels
now); 1: the MMA starts from 0x4B400000 (1.5 * 2^23), so its int32 result is read as fp32 by a
bitcast and one subtract; 2: (dense codes GEMM) software pipeline, group g's dot issued before
g-1's rescale. Dense: int4_codes_gemm over tiles, fp16 and bf16, vs nn.Linear and the default.
MoE: int4_moe, both paths, vs torch._grouped_mm. One process; rel. error vs float64 each.

  python bench/bench_group_rescale.py --out res.json
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import compress_gptoss as c  # noqa: E402
from bench_moe import per_call_us  # noqa: E402

C = c.Int4GemmConfig
TILES = [(64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4)]


def main() -> int:
    import torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", default="1024,2048")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--tokens", default="512,1024,2048")
    ap.add_argument("--skip", default="", help="dense and/or moe")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev, rows = torch.device("cuda"), []

    def timed(label, fn, copies, ref=None, **tag):
        try:
            with torch.no_grad():
                err = c.relative_error(fn(0), ref) if ref is not None else None
                us = c._time_graph_us(fn, copies, 100)
        except Exception as e:
            print(f"  {label:<40} error {type(e).__name__}: {str(e)[:160]}", flush=True)
            return float("inf")
        rows.append({**tag, "label": label, "us": us, "err": err})
        print(f"  {label:<40} {us:8.1f} us" + (f"  rel.err {err:.1e}" if err is not None else ""), flush=True)
        return us

    if "dense" not in a.skip:
        for dname in a.dtypes.split(","):
            dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dname]
            for name, k, n in c.GPT_OSS_SHAPES:
                for m in [int(v) for v in a.M.split(",")]:
                    gen = torch.Generator(device=dev).manual_seed(m + k + n)
                    x = torch.randn(m, k, generator=gen, device=dev).to(dt)
                    tag = {"kind": "dense", "shape": name, "M": m, "dtype": dname}
                    print(f"{name} M={m} {dname}", flush=True)
                    lins = [torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt) for _ in range(c._bench_copies(n * k * 2))]
                    base = timed(f"{dname} nn.Linear", lambda i: lins[i](x), len(lins), **tag)
                    del lins
                    q, ws = c._random_int4_weights(n, k, 64, gen, dev, dtype=dt)
                    wp = c.pack_int4(q)
                    cps = [(wp, ws)] + [(wp.clone(), ws.clone()) for _ in range(c._bench_copies(wp.nbytes + ws.nbytes) - 1)]
                    ref = c.int4_linear_reference(x, wp, ws, act="a8")
                    best = {}
                    best["default"] = timed("default", lambda i: c.int4_linear(x, *cps[i], act="a8"), len(cps), ref, **tag)
                    for bm, bn, w, st in TILES:
                        for r in (0, 1):
                            cfg = C(bm, bn, 64, False, w, st, codes=True, rescale=r)
                            us = timed(cfg.label(), lambda i, cfg=cfg: c.int4_linear(x, *cps[i], act="a8", config=cfg),
                                       len(cps), ref, **tag)
                            best[r] = min(best.get(r, float("inf")), us)
                    print(f"  -> {dname} x{base / best['default']:.2f} default; best codes r0 {base / best[0]:.2f}, "
                          f"r1 {base / best[1]:.2f} (x {dname})", flush=True)
                    del cps
    if "moe" not in a.skip:
        g, gd = torch.Generator().manual_seed(0), torch.Generator(device="cuda").manual_seed(0)
        k = 2880
        for name, n in (("gate_up", 5760), ("down", 2880)):
            layers = [c._random_int4_weights(n, k, 64, gd, "cuda", dtype=torch.bfloat16) for _ in range(32)]
            wp = torch.stack([c.pack_int4(q) for q, _ in layers])
            ws = torch.stack([s for _, s in layers])
            dense = torch.stack([(q.float() * s.float().repeat_interleave(64, 1)).to(torch.bfloat16).T for q, s in layers])
            del layers
            for t in (int(v) for v in a.tokens.split(",")):
                top = torch.rand(t, 32, generator=g).topk(4, dim=-1).indices.flatten()
                counts = torch.bincount(top, minlength=32).tolist()
                x = torch.randn(sum(counts), k, generator=g).to(torch.bfloat16).cuda()
                offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
                bf = per_call_us(lambda: torch._grouped_mm(x, dense, offs=offs))
                refs = c.int4_moe_reference(x, counts, wp, ws, None, act="a8")
                print(f"moe {name} T={t} grouped_mm bf16 {bf:.1f} us", flush=True)
                for codes in (False, True):
                    for r in (0, 1):
                        y = c.int4_moe(x, counts, wp, ws, None, "a8", None, codes, rescale=r)
                        err = max(c.relative_error(y[lo:hi], ref) for (lo, hi), ref in refs.items())
                        us = per_call_us(lambda: c.int4_moe(x, counts, wp, ws, None, "a8", None, codes, rescale=r))
                        rows.append({"kind": "moe", "proj": name, "tokens": t, "codes": codes, "rescale": r, "us": us,
                                     "bf16_us": bf, "err": err})
                        print(f"  {'codes' if codes else 'registers'} r{r}: {us:.1f} us ({bf / us:.2f} x bf16), "
                              f"rel.err {err:.1e}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"env": c.runtime_environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
