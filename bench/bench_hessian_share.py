#!/usr/bin/env python3
"""One GPT-OSS layer through GPTQ W4A16, plain llmcompressor against our defaults, side by side.

  python bench/bench_hessian_share.py [--hidden 1024 --experts 16 --samples 4 --seq-len 128] [--out res.json]

plain:    --no-share-hessians --propagate-all-experts (one Hessian per module, every expert on
          every token in both passes: llmcompressor 0.14 as it comes)
defaults: modules that read the same tensor share one Hessian; propagation runs routed experts.

Both runs happen in this process with the same calibration order (torch seeded), through the real
CLI (compress_gptoss.main). Times come from wrappers that call through llmcompressor's sequential
pipeline: the calibration pass (forwards with hooks on: the MoE forward plus the Hessian
accumulation; the time inside GPTQ's hook, i.e. the Hessian matmuls, separately), the GPTQ solve (sequential_epoch_end) and the propagation pass (hooks off), for the
decoder layer's subgraph. Hessian memory is the bytes of the distinct Hessian tensors GPTQ holds
when the layer is solved. The int4 outputs of both runs are compared tensor by tensor.
"""
import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MODES = {"plain": ["--no-share-hessians", "--propagate-all-experts"], "defaults": []}


def timed_run(argv: list) -> dict:
    """compress_gptoss.main(argv) with per-subgraph phase times and the Hessian bytes per solve."""
    import torch
    from compressed_tensors.utils import patch_attr
    import compress_gptoss as cg
    import llmcompressor.modifiers.gptq.base as gptq_base
    from llmcompressor.modifiers.utils.hooks import HooksMixin
    from llmcompressor.pipelines.sequential.helpers import Subgraph
    phases = defaultdict(lambda: defaultdict(float))   # subgraph index -> phase -> seconds
    hessians = []                                      # per solve: (subgraph, distinct tensors, modules, bytes)
    order, forward, compress = {}, Subgraph.forward, gptq_base.GPTQModifier.compress_modules
    calibrate = gptq_base.GPTQModifier.calibrate_module
    current = [None]

    def timed_forward(self, *a, **k):
        current[0] = order.setdefault(id(self), len(order))
        t0 = time.perf_counter()
        try:
            return forward(self, *a, **k)
        finally:
            phases[current[0]]["propagate" if HooksMixin._HOOKS_DISABLED else "calibrate"] += time.perf_counter() - t0

    def timed_calibrate(self, module, args, output):     # the Hessian matmuls (a shared one: once)
        t0 = time.perf_counter()
        try:
            return calibrate(self, module, args, output)
        finally:
            phases[current[0]]["hessian"] += time.perf_counter() - t0

    def timed_compress(self):
        distinct = {id(h): h for h in self._hessians.values()}
        hessians.append((current[0], len(distinct), len(self._hessians), sum(h.numel() * h.element_size() for h in distinct.values())))
        t0 = time.perf_counter()
        try:
            return compress(self)
        finally:
            phases[current[0]]["solve"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    with patch_attr(Subgraph, "forward", timed_forward), \
            patch_attr(gptq_base.GPTQModifier, "compress_modules", timed_compress), \
            patch_attr(gptq_base.GPTQModifier, "calibrate_module", timed_calibrate), torch.random.fork_rng():
        torch.manual_seed(0)
        rc = cg.main(argv)
    assert rc == 0, f"quantize failed: rc {rc}"
    return {"wall_s": time.perf_counter() - t0, "phases": {i: dict(p) for i, p in phases.items()},
            "hessians": hessians}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", default="/tmp/gptoss-bench-share")
    ap.add_argument("--out")
    a = ap.parse_args()
    import os
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    import tiny_gptoss
    import compress_gptoss as cg
    from transformers import AutoTokenizer
    work = Path(a.work)
    tag = f"h{a.hidden}-e{a.experts}"
    src, bf16 = work / f"{tag}-mxfp4", work / f"{tag}-bf16"
    heads = a.hidden // 64
    if not (bf16 / "config.json").exists():
        tiny_gptoss.build_random(src, tiny_gptoss.TinySpec(
            layers=1, hidden=a.hidden, intermediate=a.hidden, experts=a.experts, top_k=a.top_k, heads=heads,
            kv_heads=max(1, heads // 8), head_dim=64, vocab=1024, train_steps=0))
        assert cg.main(["dequantize", "--src", str(src), "--dst", str(bf16), "--overwrite"]) == 0
    tok = AutoTokenizer.from_pretrained(str(bf16))
    texts, cur = [], ""                         # docstrings joined until each text fills --seq-len tokens
    for t in tiny_gptoss.split_corpus(tiny_gptoss.docstring_corpus())[0]:
        cur = f"{cur}\n\n{t}" if cur else t
        if len(tok(cur)["input_ids"]) >= a.seq_len:
            texts.append(cur)
            cur = ""
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokens = sum(len(x) for x in cg.tokenized_dataset(texts[:a.samples], tok, a.seq_len)["input_ids"])
    res = {"hidden": a.hidden, "experts": a.experts, "top_k": a.top_k, "samples": a.samples,
           "seq_len": a.seq_len, "calibration_tokens": tokens, "modes": {}}
    for mode, flags in MODES.items():
        out = work / f"q-{mode}"
        res["modes"][mode] = timed_run(["quantize", "--model-in", str(bf16), "--experts", "w4a16", "--mw", "w4a16",
                                        "--group-size", "32", "--calib-jsonl", str(calib),
                                        "--num-calibration-samples", str(a.samples), "--max-seq-length",
                                        str(a.seq_len), "--output-dir", str(out), "--overwrite", "--no-eval", *flags])
    from safetensors.torch import load_file
    same = {}
    for f in sorted((work / "q-plain").glob("*.safetensors")):
        p, d = load_file(str(f)), load_file(str(work / "q-defaults" / f.name))
        same.update({k: bool((p[k] == d[k]).all()) for k in p})
    res["identical_tensors"] = f"{sum(same.values())}/{len(same)}"

    print(f"\nGPT-OSS layer: hidden {a.hidden}, {a.experts} experts (top {a.top_k}), GPTQ W4A16 g32, "
          f"{a.samples} samples = {tokens} calibration tokens; the decoder layer's subgraph:")
    print(f"{'mode':10s} {'calibrate s':>12s} {'of it Hessian s':>16s} {'solve s':>8s} {'propagate s':>12s} {'layer s':>8s} "
          f"{'Hessians':>9s} {'Hessian MB':>11s} {'run s':>7s}")
    rows = {}
    for mode, r in res["modes"].items():
        i, n, m, b = next(h for h in r["hessians"] if h[2])       # the solve that quantized modules
        p = r["phases"][i]
        rows[mode] = (p["calibrate"], p.get("solve", 0.0), p.get("propagate", 0.0))
        print(f"{mode:10s} {p['calibrate']:12.1f} {p.get('hessian', 0):16.1f} {p.get('solve', 0):8.1f} {p.get('propagate', 0):12.1f} "
              f"{sum(rows[mode]):8.1f} {f'{n}/{m}':>9s} {b / 1e6:11.1f} {r['wall_s']:7.1f}")
    (c0, s0, p0), (c1, s1, p1) = rows["plain"], rows["defaults"]
    hb0, hb1 = (next(h[3] for h in res["modes"][m]["hessians"] if h[2]) for m in ("plain", "defaults"))
    h0, h1 = (res["modes"][m]["phases"][next(h[0] for h in res["modes"][m]["hessians"] if h[2])]["hessian"]
              for m in ("plain", "defaults"))
    res["ratios"] = {"calibrate": c0 / c1, "hessian": h0 / h1, "propagate": p0 / max(p1, 1e-9), "layer": (c0 + s0 + p0) / (c1 + s1 + p1),
                     "hessian_bytes": hb0 / hb1}
    print("plain / defaults: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["ratios"].items()))
    print(f"identical int4 tensors (plain vs defaults): {res['identical_tensors']}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
