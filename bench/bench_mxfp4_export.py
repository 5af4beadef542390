#!/usr/bin/env python3
"""quantize --experts mxfp4: the MXFP4 encode of one gpt-oss-20b-sized MoE layer, side by side
with the alternative, as ratios.

  python bench/bench_mxfp4_export.py [--device auto|cpu|cuda] [--gptq] [--out FILE]

Random BF16 expert weights with gpt-oss-20b's dimensions (32 experts, hidden 2880, intermediate
2880: gate_up [E, 2880, 5760], down [E, 2880, 2880]) on the device, then, each timed (median of
--iters, the device synchronized):
  ours         encode_mxfp4_blocks (OCP rule) of both tensors, as `quantize --algo rtn` runs it
  ct_rtn       compressed-tensors' own MXFP4A16 round to nearest, what llmcompressor's RTN does per
               expert Linear: group min/max -> calculate_qparams (E8M0 scales) -> MXFP4PackedCompressor
  gptq         (--gptq) llmcompressor's GPTQ (quantize_weight, MXFP4A16) of the layer's experts on a
               Hessian of random tokens, plus our exact mapping onto E2M1 codes + E8M0 bytes
The JSON also says how often the two RTN rules pick the same scale (they differ only where a block's
amax is >= 1.75 x 2^n: compressed-tensors rounds that up, OCP saturates) and whether the values
agree where they do. Prints JSON to stdout and, with --out, writes it there. Exit 3 (and "needs ...")
where it cannot run: --device cuda without a GPU, llmcompressor / compressed-tensors missing.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda[:N] (default: %(default)s)")
    ap.add_argument("--experts", type=int, default=32, help="experts in the layer (default: %(default)s, gpt-oss-20b)")
    ap.add_argument("--hidden", type=int, default=2880, help="hidden size (default: %(default)s)")
    ap.add_argument("--intermediate", type=int, default=2880, help="intermediate size (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=5, help="timed repetitions, median kept (default: %(default)s)")
    ap.add_argument("--gptq", action="store_true", help="also time llmcompressor's GPTQ-MXFP4 of the layer")
    ap.add_argument("--tokens", type=int, default=2048, help="--gptq: random tokens of its Hessian (default: %(default)s)")
    ap.add_argument("--out", metavar="FILE", help="also write the JSON here")
    a = ap.parse_args(argv)
    for flag in ("experts", "hidden", "intermediate", "iters", "tokens"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag} {getattr(a, flag)}: give 1 or more")
    for flag in ("hidden", "intermediate"):
        if getattr(a, flag) % 32:
            ap.error(f"--{flag} {getattr(a, flag)}: MXFP4 blocks are 32 values, give a multiple of 32")
    return a


def needs(what: str) -> None:
    print(f"bench_mxfp4_export: needs {what}", file=sys.stderr)
    sys.exit(3)


def timed(fn, device, iters: int) -> tuple[float, object]:
    import torch
    result = fn()                          # warm-up (kernels, allocator)
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def ct_rtn(weights, args, compressor, scheme):
    """compressed-tensors' MXFP4A16 RTN, one Linear [out, in] at a time (as llmcompressor quantizes them)."""
    from compressed_tensors.quantization.utils import calculate_qparams
    packed, scales = [], []
    for w in weights:                                          # [out, in] per expert
        g = w.reshape(w.shape[0], -1, 32)
        scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
        sd = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
        packed.append(sd["weight_packed"])
        scales.append(sd["weight_scale"])
    return packed, scales


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        import torch
        from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
        from compressed_tensors.quantization import QuantizationScheme
        from compressed_tensors.quantization.quant_scheme import MXFP4A16
    except ImportError as e:
        needs(f"torch and compressed-tensors 0.19+ with MXFP4 ({e})")
    import compress_gptoss as cg
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        needs("a CUDA GPU for --device cuda (none is visible to torch); run with --device cpu")
    # llmcompressor logs to stdout: from here on everything but the JSON goes to stderr
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    g = torch.Generator(device=device).manual_seed(0)
    E, H, I = a.experts, a.hidden, a.intermediate
    # transformers' layout [E, in, out], weights like a trained gpt-oss expert (std ~0.02)
    gate_up = (torch.randn(E, H, 2 * I, generator=g, device=device) * 0.02).to(torch.bfloat16)
    down = (torch.randn(E, I, H, generator=g, device=device) * 0.02).to(torch.bfloat16)
    linears = [gate_up.transpose(1, 2), down.transpose(1, 2)]     # [E, out, in]
    values = sum(w.numel() for w in linears)
    res = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
           "dims": {"experts": E, "hidden": H, "intermediate": I}, "values": values, "iters": a.iters}

    t_ours, ours = timed(lambda: [cg.encode_mxfp4_blocks(w) for w in linears], device, a.iters)
    res["ours"] = {"seconds": t_ours, "gb_per_s_bf16_in": 2 * values / t_ours / 1e9}

    args = MXFP4A16["weights"].model_copy(deep=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    t_ct, (ct_packed, ct_scales) = timed(
        lambda: ct_rtn([m for w in linears for m in w], args, MXFP4PackedCompressor, scheme), device, max(1, a.iters // 2))
    res["ct_rtn"] = {"seconds": t_ct, "gb_per_s_bf16_in": 2 * values / t_ct / 1e9, "ours_speedup": t_ct / t_ours}

    ours_scales = torch.cat([s.reshape(-1) for _, s in ours])
    ct_flat = torch.cat([s.reshape(-1) for s in ct_scales]).to(ours_scales.dtype)
    same = ours_scales == ct_flat
    ours_vals = torch.cat([cg.decode_mxfp4_blocks(b, s).reshape(-1, 32) for b, s in ours])
    ct_vals = torch.cat([MXFP4PackedCompressor.decompress({"weight_packed": p, "weight_scale": s}, scheme)["weight"]
                         .float().reshape(-1, 32) for p, s in zip(ct_packed, ct_scales)])
    res["rules"] = {"same_scale_fraction": float(same.float().mean()),
                    "values_equal_where_same_scale": bool(torch.equal(ours_vals[same], ct_vals[same]))}

    if a.gptq:
        try:
            from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
            from compressed_tensors.quantization.utils import calculate_qparams
        except ImportError as e:
            needs(f"llmcompressor 0.14 for --gptq ({e})")
        x = torch.randn(a.tokens, H, generator=g, device=device)
        hessian = 2 * x.T @ x / a.tokens                          # gate_up's input; down reuses its shape class
        xd = torch.randn(a.tokens, I, generator=g, device=device)
        hessian_down = 2 * xd.T @ xd / a.tokens

        def gptq_layer():
            out = []
            for w, h in ((linears[0], hessian), (linears[1], hessian_down)):
                grp = w.float().reshape(E, w.shape[1], -1, 32)
                scale, zp = calculate_qparams(grp.amin(-1), grp.amax(-1), args)
                q, _, _ = quantize_weight(w.float().clone(), h.expand(E, -1, -1).clone(), scale, zp, None, args)
                out.append([cg.mxfp4_from_fake_quantized(q[e].cpu(), scale[e].cpu(), f"expert {e}") for e in range(E)])
            return out
        t_gptq, _ = timed(gptq_layer, device, 1)
        res["gptq"] = {"seconds": t_gptq, "over_ours_rtn": t_gptq / t_ours, "tokens": a.tokens}
    text = json.dumps(res, indent=2)
    print(text, file=json_out, flush=True)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
