#!/usr/bin/env python3
"""What summing split-K shares in a fixed order costs: the built-in kernels' default configs (per-split
slices, summed in split order: the same bits every call) against the same configs with fp32 atomics
(split_stores=False: fewer stores, an order that varies), side by side on the GPT-OSS shapes at the
M whose configs split K. Also the default with half and with twice its split, the default launched
plainly instead of with programmatic dependent launch (sm_90+: "no PDL"), and fp16/bf16
nn.Linear for scale.

Graph timing in verify-runtime --bench's worker processes (same weights copies, same medians); the
variants' order flips every round, and every figure is a median over rounds. Needs a CUDA GPU.

  python bench/bench_split_k.py --rounds 3 --out split.json
  python bench/bench_split_k.py --M 16 --group channel --act a8,a16
  python bench/bench_split_k.py --impl OLD.py ...   # the kernels of another copy of compress_gptoss.py
"""
import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def variants(c, m: int, n: int, k: int, group, act: str, dtype: str) -> dict:
    """{name: Int4GemmConfig} for one case; empty when the default does not split K."""
    base = c.int4_gemm_config(m, n, k, per_channel=group is None, act=act, bf16=dtype == "bf16")
    if base.split_k == 1:
        return {}
    out = {"slices": replace(base, split_stores=True), "atomics": replace(base, split_stores=False)}
    if base.split_k >= 4:
        out["slices split/2"] = replace(base, split_k=base.split_k // 2, split_stores=True)
    if base.split_k <= 8 and -(-k // 64) >= 4 * base.split_k:   # every share still two groups or more
        out["slices split*2"] = replace(base, split_k=base.split_k * 2, split_stores=True)
    if base.pdl and (base.grouped or base.gemv):   # the kernels that take PDL (ignored where unsupported)
        out["slices no PDL"] = replace(base, pdl=False)
    return out


def jobs_for_round(c, rnd: int, ms, acts, group, dtype: str) -> list[dict]:
    jobs = []
    for shape, k, n in c.GPT_OSS_SHAPES:
        for m in ms:
            case = {"shape": shape, "M": m, "K": k, "N": n, "group": group, "dtype": dtype, "graph_only": True}
            todo = [("linear", "fp16", None)] + [(f"{act} {name}", "w4" + act, cfg) for act in acts
                                                 for name, cfg in variants(c, m, n, k, group, act, dtype).items()]
            if len(todo) == 1:
                continue
            for name, backend, cfg in (todo if rnd % 2 == 0 else todo[:1] + todo[:0:-1]):
                jobs.append({**case, "id": f"r{rnd}-{shape}-{m}-{name}", "variant": name, "backend": backend,
                             "label": name if cfg is None else f"{name} {cfg.label()}",
                             **({"config": cfg.__dict__} if cfg else {})})
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--M", default="1,16,64", help="row counts (default 1,16,64: the M whose default configs split K)")
    ap.add_argument("--act", default="a8", help="a8, a16 or a8,a16 (default a8)")
    ap.add_argument("--group", default="64", choices=("32", "64", "128", "channel"), help="default 64")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--impl", type=Path, default=ROOT / "compress_gptoss.py",
                    help="the compress_gptoss.py whose kernels are timed (default: this checkout's)")
    ap.add_argument("--out", type=Path, help="write every row and the medians as JSON")
    args = ap.parse_args(argv)
    acts = args.act.split(",")
    if not set(acts) <= {"a8", "a16"} or not all(x.strip().isdigit() and int(x) > 0 for x in args.M.split(",")):
        ap.error(f"--act takes a8 and/or a16, --M positive row counts, comma-separated (got {args.act!r}, {args.M!r})")
    if not args.impl.is_file():
        ap.error(f"--impl {args.impl}: no such file")
    from bench_large_m import load_module   # this folder is on sys.path: the script's own
    c = load_module(str(args.impl.resolve()), "compress_gptoss_timed")   # its bench workers load that file
    import torch
    if not torch.cuda.is_available():
        print("bench_split_k: needs a CUDA GPU", file=sys.stderr)
        return 3
    ms = [int(x) for x in args.M.split(",")]
    group = None if args.group == "channel" else int(args.group)
    rows = []
    for rnd in range(args.rounds):
        jobs = jobs_for_round(c, rnd, ms, acts, group, args.dtype)
        res = c.run_bench_workers(jobs, args.iters, graph=True)
        rows += [{**{k: j[k] for k in ("shape", "M", "K", "N", "variant", "label")}, "round": rnd, **res[j["id"]]}
                 for j in jobs]
    medians = {}
    for r in rows:
        medians.setdefault((r["shape"], r["M"]), {}).setdefault(r["variant"], []).append(r)
    table = []
    print(f"\n{args.impl.name}: graph us, median of {args.rounds} rounds; group {args.group}, {args.dtype}")
    for (shape, m), by in medians.items():
        line = {"shape": shape, "M": m}
        for name, rs in by.items():
            ok = [r for r in rs if "graph_us" in r]
            line[name] = statistics.median(r["graph_us"] for r in ok) if ok else None
            line[name + " label"] = rs[0]["label"]
            line[name + " rel_err"] = max((r["rel_err"] for r in ok), default=None)
            if len(ok) < len(rs):
                line[name + " error"] = next(r["error"] for r in rs if "error" in r)
        ratios = []
        for act in acts:
            for twin, ratio in (("atomics", "slices/atomics"), ("slices no PDL", "PDL/plain")):
                s, t = line.get(f"{act} slices"), line.get(f"{act} {twin}")
                if s and t:
                    line[f"{act} {ratio}"] = s / t
                    ratios.append(f"  {act} {ratio} {s / t:.3f}")
        table.append(line)
        cells = "  ".join(f"{name} {line[name]:.2f}" if line[name] is not None else f"{name} {line.get(name + ' error')}"
                          for name in by) + "".join(ratios)
        print(f"{shape:<16} M={m:<4} {cells}")
    if args.out:
        args.out.write_text(json.dumps({"impl": str(args.impl), "group": args.group, "dtype": args.dtype,
                                        "rounds": args.rounds, "table": table, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
