#!/usr/bin/env python3
"""Prefill and decode of a whole W4A8 checkpoint through the built-in kernels, at gpt-oss-20b's
real layer dimensions, against the dense decompression and the BF16 source (one process each
for build, dequantize and quantize; one verify-runtime process times the three models).

  python bench/bench_prefill.py --layers 2 --prefill 128,512,2048 [--scheme w4a8|w4a16] [--experts 128] [--out res.json]
  python bench/bench_prefill.py --small ...      # the same steps at tiny dimensions (a CPU smoke run)
  python bench/bench_prefill.py --before OLD.py  # also verify-runtime with another copy of compress_gptoss.py,
                                                 # then the new code again: before / now in one run
  python bench/bench_prefill.py --profile 1,2048 # then, in this process: the kernels model and the BF16
                                                 # source under torch.profiler, one forward per length
  python bench/bench_prefill.py --graph 8,64     # then, in this process: decode 64 tokens into a StaticCache,
                                                 # eagerly and as CUDA-graph replays, kernels model and BF16
  python bench/bench_prefill.py --layers 24 --drop-source  # the MXFP4 source deleted once dequantized (disk)
  python bench/bench_prefill.py --check 1,128    # then: every int4_linear call of one forward per length
                                                 # against its float64 reference (int4_linear_reference)

Builds random MXFP4 codes with gpt-oss-20b's dimensions (hidden 2880, 32 experts, top-4, 64 heads,
vocab 201088; --experts 128: 120b's) and `--layers` layers, runs the real `dequantize`, then
`quantize --algo rtn` (RTN: no Hessians, so quantizing costs seconds; the kernels' speed does not
depend on how the codes were chosen), then `verify-runtime --model --prefill-tokens` on the result.
In the kernels model each layer's experts run stacked, two int4_moe launches per layer (gate_up,
down), each routed expert getting about T x 4 / E of T prompt tokens; the BF16 source runs
transformers' own GptOssExperts (grouped_mm by default).
"""
import argparse
import cProfile
import json
import pstats
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GPTOSS_20B_LAYER = dict(hidden=2880, intermediate=2880, experts=32, top_k=4, heads=64, kv_heads=8,
                        head_dim=64, vocab=201088, window=128)   # window: GPT-OSS's 128 (not the fixture's 32)


def cli(*args, log: Path, script: Path = ROOT / "compress_gptoss.py") -> tuple:
    """Run compress_gptoss.py; its stderr goes to `log`. Returns (wall time, stdout); exits on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(script), *map(str, args)],
                           stdout=subprocess.PIPE, stderr=f, text=True)
    if r.returncode:
        raise SystemExit(f"{args[0]} failed (rc {r.returncode}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def report(rep: dict, title: str, new_tokens: int) -> None:
    print(f"\n== {title}; device {rep['device']}")
    print(f"kernels: {rep.get('kernels', 'none (dense fallback)')}")
    if "agreement" in rep:
        ag = rep["agreement"]
        print(f"vs dense: KL median {ag['kl_median']:.2e} mean {ag['kl_mean']:.2e}, top-1 {ag['top1_agreement']:.3f}, "
              f"greedy tokens identical {rep['same_greedy_tokens']}/{rep['new_tokens']}")
    runs = {"kernels": rep.get("quantized", {}), "dense": rep["dense"], "bf16": rep["bf16_source"]}

    def row(what, pick):
        v = {k: pick(r) for k, r in runs.items()}
        ratio = lambda x, y: f"{x / y:.2f}" if x and y else "-"   # noqa: E731
        fmt = lambda x: f"{x:,.0f}" if x else "-"                  # noqa: E731
        print(f"| {what} | {fmt(v['kernels'])} | {fmt(v['dense'])} | {fmt(v['bf16'])} | "
              f"{ratio(v['kernels'], v['bf16'])} | {ratio(v['kernels'], v['dense'])} |")
    print("| tokens/s | kernels | dense decompressed | BF16 source | kernels / BF16 | kernels / dense |")
    print("|---|---|---|---|---|---|")
    row(f"decode ({new_tokens} new)", lambda r: r.get("tokens_per_s"))
    row("decode, CUDA graph", lambda r: (r.get("graph_decode") or {}).get("tokens_per_s"))
    for who, r in runs.items():
        if "graph_decode" in r:
            print(f"{who} graph decode: {r['graph_decode']}")
    for t in rep["prefill_tokens"]:
        row(f"prefill {t}", lambda r, t=t: r.get("prefill_tokens_per_s", {}).get(str(t)))


def check_calls(q: Path, lengths: list) -> dict:
    """Relative error of every int4_linear call (attention; experts when not stacked) and of every
    expert's rows in every int4_moe call, in one forward of the kernels model, against
    int4_linear_reference (float64, the same int4 codes and the same per-token int8 activations),
    grouped by (N, K). Both are wrapped in this process only to see each call's operands."""
    import torch
    sys.path.insert(0, str(ROOT))
    import compress_gptoss as cg
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kernel, errors = cg.int4_linear, {}

    def checked(x, weight_packed, weight_scale, act="a8", bias=None, **kw):
        y = kernel(x, weight_packed, weight_scale, act=act, bias=bias, **kw)
        ref = cg.int4_linear_reference(x, weight_packed, weight_scale, act=act)
        if bias is not None:
            ref = ref + bias.double()
        key = f"N={weight_packed.shape[0]} K={x.shape[-1]} M={x.reshape(-1, x.shape[-1]).shape[0] > 64 and '>64' or '<=64'}"
        # the floor: the reference itself rounded once to the output dtype (bf16 keeps 8 bits)
        floor = cg.relative_error(ref.to(y.dtype), ref)
        errors.setdefault(key, []).append((cg.relative_error(y.reshape(ref.shape), ref), floor))
        return y
    moe_kernel = cg.int4_moe

    def checked_moe(x, counts, weight_packed, weight_scale, bias=None, act="a8"):
        y = moe_kernel(x, counts, weight_packed, weight_scale, bias, act)
        key = f"int4_moe N={weight_packed.shape[1]} K={x.shape[-1]}"
        for (lo, hi), ref in cg.int4_moe_reference(x, counts, weight_packed, weight_scale, bias, act=act).items():
            errors.setdefault(key, []).append((cg.relative_error(y[lo:hi], ref), cg.relative_error(ref.to(y.dtype), ref)))
        return y
    model = cg.load_quantized_model(q)
    cg.attach_int4_kernels(model)
    model.to(dev).eval()
    cg.int4_linear, cg.int4_moe = checked, checked_moe
    out = {}
    try:
        for t in lengths:
            errors.clear()
            ids = torch.randint(0, model.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t)).to(dev)
            with torch.no_grad():
                model(ids, logits_to_keep=1)
            out[t] = {k: {"calls": len(v), "max": max(e for e, _ in v), "median": sorted(e for e, _ in v)[len(v) // 2],
                          "max_over_floor": max(e / f for e, f in v), "floor_median": sorted(f for _, f in v)[len(v) // 2]}
                      for k, v in errors.items()}
            worst = max(e["max"] for e in out[t].values())
            print(f"\n== every kernel call of one {t}-token forward vs float64 ({x_dtype(model)} in and out): worst {worst:.2e}; "
                  f"floor = the float64 result rounded once to {x_dtype(model)}")
            for k, e in sorted(out[t].items()):
                print(f"  {k}: {e['calls']} calls, relative error median {e['median']:.2e}, max {e['max']:.2e}; "
                      f"floor median {e['floor_median']:.2e}; worst error / its floor {e['max_over_floor']:.2f}")
    finally:
        cg.int4_linear, cg.int4_moe = kernel, moe_kernel
    return out


def x_dtype(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def load_model(who: str, q: Path, bf16: Path):
    """The kernels model (the quantized checkpoint through the built-in kernels) or the BF16 source."""
    import torch
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, str(ROOT))
    import compress_gptoss as cg
    if who == "bf16":
        return AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    model = cg.load_quantized_model(q)
    cg.attach_int4_kernels(model)
    return model


def profile(q: Path, bf16: Path, lengths: list, rows: int) -> dict:
    """One forward per length of the kernels model and of the BF16 source: wall time (no profiler),
    then under torch.profiler the GPU's busy time (sum of kernel times) and the top ops. Wall much
    above busy = the host (Python, launches) is what the forward waits on."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    out, dev = {}, "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a smoke run (TRITON_INTERPRET=1)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for who in ("kernels", "bf16"):
        model = load_model(who, q, bf16).to(dev).eval()
        for t in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, t), device=dev)
            with torch.no_grad():
                walls = []
                for _ in range(4):   # the first compiles
                    sync()
                    t0 = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    sync()
                    walls.append(time.perf_counter() - t0)
                with torch_profile(activities=acts) as prof:
                    model(ids, logits_to_keep=1)
                    sync()
            ev = prof.key_averages()
            busy = sum(e.self_device_time_total for e in ev) / 1e3
            wall = sorted(walls[1:])[1] * 1e3
            out[f"{who}_{t}"] = {"wall_ms": wall, "gpu_busy_ms": busy}
            print(f"\n== profile {who}, {t} tokens: wall {wall:.2f} ms (median of 3, no profiler), GPU busy {busy:.2f} ms "
                  f"({busy / wall:.0%} of wall)")
            print(ev.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
            print(ev.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
            prof_py = cProfile.Profile()   # the host's Python side (launchers, the expert loop)
            with torch.no_grad():
                prof_py.runcall(model, ids, logits_to_keep=1)
                sync()
            pstats.Stats(prof_py).sort_stats("tottime").print_stats(rows)
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


def route_rings(model, steps: int):
    """Forward hooks on every router that write each one-token step's top-k experts and the gap between
    the k-th and (k+1)-th router logit into device rings, at a device counter: capture-safe (no host
    sync, no Python list), so a CUDA graph replays the writes (compress_gptoss.router_recorder appends
    to a Python list, which a replay would not redo). Returns ({layer: (experts, gaps, counter)}, handles)."""
    import torch
    rings, handles = {}, []
    for name, m in model.named_modules():
        if not name.endswith("mlp.router"):
            continue
        dev = next(m.parameters()).device
        ring = (torch.zeros(steps, m.top_k, dtype=torch.long, device=dev), torch.zeros(steps, device=dev),
                torch.zeros(1, dtype=torch.long, device=dev))

        def hook(mod, inp, out, ring=ring):
            logits = out[0]
            if logits.shape[0] != 1:   # the prompt's forward
                return
            experts, gaps, at = ring
            top = logits.float().topk(mod.top_k + 1, dim=-1)
            row = at.clamp(max=experts.shape[0] - 1)
            # the router's own choice (out[2]): a top-k of our own could break an exact tie otherwise
            experts.index_copy_(0, row, out[2].reshape(1, -1).sort(-1).values)
            gaps.index_copy_(0, row, top.values[:, mod.top_k - 1] - top.values[:, mod.top_k])
            at.add_(1)
        rings[name] = ring
        handles.append(m.register_forward_hook(hook))
    return rings, handles


def route_flips(first: dict, other: dict, rel: list) -> dict:
    """Where another run's experts differ from the first run's (same tokens fed): per step, the
    layers that flipped and the first run's top-k gap there, beside the median gap over all steps and layers."""
    import torch
    flips, all_gaps = [], torch.cat([g.cpu() for _, g, _ in first.values()])
    for layer, (f_idx, f_gap, _) in first.items():
        for step in (f_idx.cpu() != other[layer][0].cpu()).any(-1).nonzero().flatten().tolist():
            flips.append({"step": step, "layer": layer, "gap": float(f_gap[step]), "logits_rel_err": rel[step]})
    return {"flips": flips, "gap_median": float(all_gaps.median()), "gap_min": float(all_gaps.min())}


def eager_and_graph(cg, model, who: str, ids, new: int, routes: bool, dev: str, repeats: int = 1) -> dict:
    """One prompt through static_cache_decode eagerly, then as graph replays fed the eager tokens;
    with repeats, again (eager, graph, ...), every run fed the same tokens and compared step by step
    with the first eager run: which mode a one-step jump belongs to, and whether it comes back."""
    warm, prompt = cg.GRAPH_WARMUP_STEPS, ids.shape[1]
    runs, rings = {}, {}
    modes = ("eager", "graph") if dev == "cuda" else ("eager",)
    for i, mode in enumerate(m for _ in range(repeats) for m in modes):
        name = mode if i < len(modes) else f"{mode} {i // len(modes) + 1}"
        if routes:
            rings[name], handles = route_rings(model, warm + new)
        try:
            r = cg.static_cache_decode(model, ids, new, graph=mode == "graph", feed=runs["eager"]["fed"] if i else None)
        except cg.UserError as e:
            raise SystemExit(f"--graph: {e}")
        except Exception as e:   # a sync inside the capture: report it, keep the other runs
            where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)]
            runs[name] = {"failed": f"{type(e).__name__}: {str(e)[:200]} at {' < '.join(where[::-1][:6])}"}
            print(f"\n== graph decode {who} {name}: FAILED {runs[name]['failed']}", flush=True)
            continue
        finally:
            for h in handles if routes else ():
                h.remove()
        logits = r.pop("logits")
        runs[name] = r
        if i == 0:
            ref = logits
        else:   # against the first eager run's logits of the same step and the same tokens fed
            rel = [float((g.double() - e.double()).norm() / e.double().norm()) for g, e in zip(logits, ref)]
            r["logits_rel_err"], r["logits_rel_err_max"] = rel, max(rel)
            r["same_argmax"] = sum(int(g.argmax()) == int(e.argmax()) for g, e in zip(logits, ref))
            r["steps_over_0.1"] = [j for j, x in enumerate(rel) if x > 0.1]
        print(f"\n== graph decode {who} {name}: {r['tokens_per_s']:.1f} tokens/s over {new} steps (prompt {prompt})"
              + (f"; logits vs eager, same tokens fed: max rel. difference {r['logits_rel_err_max']:.1e}, "
                 f"same argmax {r['same_argmax']}/{warm + new}, steps > 0.1: {r['steps_over_0.1']}" if i else ""),
              flush=True)
        if routes and i:
            r["routes"] = fl = route_flips(rings["eager"], rings[name], rel)
            print(f"== routes {who} {name}: vs eager, experts differ at (step, layer, eager top-k gap): "
                  f"{[(f['step'], f['layer'].split('.')[-3], round(f['gap'], 4)) for f in fl['flips']]}; "
                  f"top-k gap over all steps and layers: median {fl['gap_median']:.3g}, min {fl['gap_min']:.3g}",
                  flush=True)
    return runs


def graph_decode(q: Path, bf16: Path, prompt: int, new: int, routes: bool = False, seeds: tuple = (0,),
                 repeats: int = 1) -> dict:
    """Greedy decode into a StaticCache of the kernels model and of the BF16 source, eagerly and as
    CUDA-graph replays (compress_gptoss.static_cache_decode, which verify-runtime --model runs too).
    Eager decode is bound by the host (--profile: the GPU is busy ~28 % of a 1-token forward), a
    graph replay is not: the gap is what launches cost. The graph run is fed the eager run's tokens
    (teacher forcing: this random model's logits are near ties, so one rounding apart would send
    free-running tokens elsewhere) and its logits are compared with the eager ones step by
    step. Both modes do the same two copies per step (a token in or out, the logits out).
    routes: also record every router's experts per step in both modes (route_rings; its hooks add
    to the timed steps) and list where the graph's experts differ from the eager run's. seeds: one
    random prompt each; repeats: the kernels model's eager and graph runs per prompt (eager_and_graph)."""
    import torch
    sys.path.insert(0, str(ROOT))
    import compress_gptoss as cg
    dev = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: eager only, a smoke run
    out = {}
    for who in ("kernels", "bf16"):
        model = load_model(who, q, bf16).to(dev).eval()
        for seed in seeds:   # a prompt per seed; the first seed's runs under `who`, the others' beside them
            ids = torch.randint(0, model.config.vocab_size, (1, prompt),
                                generator=torch.Generator().manual_seed(seed)).to(dev)
            label = who if seed == seeds[0] else f"{who} seed {seed}"
            out[label] = eager_and_graph(cg, model, label, ids, new, routes, dev,
                                         repeats if who == "kernels" else 1)
        model = None
        if dev == "cuda":
            torch.cuda.empty_cache()
    for mode in ("eager", "graph"):
        k, b = (out[w].get(mode, {}).get("tokens_per_s") for w in ("kernels", "bf16"))
        if k and b:
            print(f"== graph decode {mode}: kernels / BF16 = {k / b:.2f}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", default="128,512,2048", help="prompt lengths to time")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--scheme", default="w4a8", choices=["w4a8", "w4a16"],
                    help="experts and attention (w4a16 is made --symmetric: the kernels take symmetric int4)")
    ap.add_argument("--experts", type=int, default=32, help="experts per layer (128: gpt-oss-120b's)")
    ap.add_argument("--small", action="store_true", help="tiny dimensions (smoke run on a CPU)")
    ap.add_argument("--work", default="/tmp/gptoss-prefill")
    ap.add_argument("--before", type=Path, help="a copy of compress_gptoss.py to time too, between two runs of this one")
    ap.add_argument("--profile", help="prompt lengths to profile (torch.profiler) after the timed runs, e.g. 1,2048")
    ap.add_argument("--rows", type=int, default=20, help="--profile: table rows")
    ap.add_argument("--check", help="prompt lengths at which to check every kernel call against float64, e.g. 1,128")
    ap.add_argument("--graph", help="PROMPT,NEW: then decode NEW tokens into a StaticCache, eager and as CUDA-graph "
                                    "replays, both models, e.g. 8,64 (all within the sliding window: 128 at gpt-oss dims, "
                                    "32 with --small)")
    ap.add_argument("--drop-source", action="store_true",
                    help="delete the random MXFP4 checkpoint once dequantized (24 layers at 20b dims: 13 + 42 + 12 GB "
                         "do not fit a 64 GB disk together, 42 + 12 do)")
    ap.add_argument("--seeds", default="0", help="--graph: one random prompt per seed, e.g. 0,1,2,3")
    ap.add_argument("--repeats", type=int, default=1,
                    help="--graph: run the kernels model's eager and graph decode this many times per prompt")
    ap.add_argument("--routes", action="store_true",
                    help="--graph: also record every router's experts per step and show where graph and eager differ")
    ap.add_argument("--out")
    a = ap.parse_args()
    import tiny_gptoss
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    dims = {} if a.small else {**GPTOSS_20B_LAYER, "experts": a.experts}
    tag = f"{'tiny' if a.small else '20b' if a.experts == 32 else f'{a.experts}x'}-{a.layers}L"
    src = work / f"{tag}-mxfp4"
    res = {"layers": a.layers, "dims": dims or "tiny", "scheme": a.scheme}
    t0 = time.perf_counter()
    if not (src / "config.json").exists():
        tiny_gptoss.build_random(src, tiny_gptoss.TinySpec(**{**tiny_gptoss.asdict(tiny_gptoss.TinySpec()), **dims,
                                                            "layers": a.layers, "train_steps": 0}))
    res["build_s"] = time.perf_counter() - t0
    bf16, q = work / f"{tag}-bf16", work / f"{tag}-{a.scheme}"
    res["dequantize_s"], _ = cli("dequantize", "--src", src, "--dst", bf16, "--overwrite", log=work / "dequantize.log")
    if a.drop_source:
        shutil.rmtree(src)
    calib = tiny_gptoss.corpus_jsonl(work / "calib.jsonl", "train", 8)
    flags = ["--symmetric"] if a.scheme == "w4a16" else []
    res["quantize_s"], _ = cli("quantize", "--model-in", bf16, "--algo", "rtn", "--experts", a.scheme, "--mw", a.scheme,
                               *flags, "--calib-jsonl", calib, "--num-calibration-samples", "8", "--max-seq-length", "64",
                               "--output-dir", q, "--overwrite", "--no-eval", log=work / "quantize.log")
    verify = ["verify-runtime", "--model", q, "--bf16", bf16, "--new-tokens", a.new_tokens, "--prefill-tokens", a.prefill,
              "--json"]
    order = [("now", ROOT / "compress_gptoss.py")] + ([("before", a.before), ("now", ROOT / "compress_gptoss.py")]
                                                      if a.before else [])
    for i, (who, script) in enumerate(order):
        took, out = cli(*verify, log=work / f"verify_{i}_{who}.log", script=script)
        res[f"verify_{i}_{who}"] = rep = json.loads(out)
        rep["wall_s"] = took
        report(rep, f"{tag} {a.scheme}, verify-runtime run {i} ({who}: {script.name}), {took:.0f} s", a.new_tokens)
        if a.out:   # after every run: a later one may not finish inside the caller's time limit
            Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"\nbuild {res['build_s']:.0f} s, dequantize {res['dequantize_s']:.0f} s, quantize {res['quantize_s']:.0f} s")
    if a.check:
        res["check"] = check_calls(q, [int(t) for t in a.check.split(",")])
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2))
    if a.graph:
        res["graph_decode"] = graph_decode(q, bf16, *map(int, a.graph.split(",")), routes=a.routes,
                                           seeds=tuple(int(x) for x in a.seeds.split(",")), repeats=a.repeats)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2))
    if a.profile:
        res["profile"] = profile(q, bf16, [int(t) for t in a.profile.split(",")], a.rows)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
