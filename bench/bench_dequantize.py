#!/usr/bin/env python3
"""dequantize benchmarks: side by side with the alternative, in one run, as ratios.

  python bench/bench_dequantize.py e2e  --layers 1 [--device cpu|cuda] [--with-transformers]
      builds a GPT-OSS checkpoint with gpt-oss-120b's layer dimensions (random MXFP4 codes), then
      runs `dequantize --method stream` (and `--method transformers`) on it as subprocesses:
      wall time, peak RSS, and the time to just write the same number of bytes on the same disk.
  python bench/bench_dequantize.py marginal --layers 1,3 --device cuda
      e2e at two layer counts: the difference is the cost of the extra layers without the fixed
      part (start-up, imports, embeddings); projects gpt-oss-120b (36 layers) against its disk time.
  python bench/bench_dequantize.py decode   (CUDA)
      one 120b layer's gate_up (128 x 5760 x 90 x 16 bytes of blocks) decoded on the GPU by
      transformers' convert_moe_packed_tensors and by ours, against the device copy bandwidth.

Prints a table and, with --out, writes the figures as JSON.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run_cli(*args) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "compress_gptoss.py"), *map(str, args)],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"dequantize failed:\n{r.stderr[-3000:]}")
    m = re.search(r"peak RSS ([\d.]+) (MB|GB)", r.stderr)
    rss = float(m.group(1)) * (1e9 if m.group(2) == "GB" else 1e6)
    a = re.search(r"anonymous ([\d.]+) (MB|GB)", r.stderr)
    anon = float(a.group(1)) * (1e9 if a.group(2) == "GB" else 1e6) if a else None
    return {"wall_s": wall, "peak_rss_bytes": rss, "peak_anon_rss_bytes": anon}


def disk_write_seconds(path: Path, nbytes: int) -> float:
    """Time to write nbytes of random data and fsync: the floor for any converter on this disk."""
    chunk = os.urandom(64 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def bench_e2e(a) -> dict:
    import tiny_gptoss
    work = Path(a.work)
    src = work / f"gptoss120b-dims-{a.layers}L-mxfp4"
    if not (src / "config.json").exists():
        print(f"building {src} ...", file=sys.stderr)
        tiny_gptoss.build_random(src, tiny_gptoss.TinySpec(**{**tiny_gptoss.asdict(tiny_gptoss.TinySpec()),
                                                            **tiny_gptoss.GPTOSS_120B_LAYER,
                                                            "layers": a.layers, "train_steps": 0}))
    res = {"layers": a.layers, "source_bytes": dir_bytes(src)}
    dst = work / "out-stream"
    res["stream"] = run_cli("dequantize", "--src", src, "--dst", dst, "--overwrite", "--device", a.device)
    res["output_bytes"] = dir_bytes(dst)
    res["disk_write_s"] = disk_write_seconds(work / "disk-probe.bin", res["output_bytes"])
    if a.with_transformers:
        dst_t = work / "out-transformers"
        res["transformers"] = run_cli("dequantize", "--src", src, "--dst", dst_t, "--overwrite",
                                      "--method", "transformers", "--device-map",
                                      "auto" if a.device.startswith("cuda") else "cpu-only")
        import shutil
        shutil.rmtree(dst_t)
    import shutil
    shutil.rmtree(dst)
    s = res["stream"]
    print(f"\nGPT-OSS-120b dims, {a.layers} layer(s): source {res['source_bytes']/1e9:.2f} GB -> output "
          f"{res['output_bytes']/1e9:.2f} GB, device {a.device}")
    print(f"{'method':<14}{'wall s':>9}{'GB/s out':>10}{'peak RSS GB':>13}{'anon GB':>9}")
    for k in ("stream", "transformers"):
        if k in res:
            r = res[k]
            anon = f"{r['peak_anon_rss_bytes']/1e9:>9.2f}" if r["peak_anon_rss_bytes"] else f"{'-':>9}"
            print(f"{k:<14}{r['wall_s']:>9.1f}{res['output_bytes']/r['wall_s']/1e9:>10.2f}"
                  f"{r['peak_rss_bytes']/1e9:>13.2f}{anon}")
    print(f"{'disk write':<14}{res['disk_write_s']:>9.1f}{res['output_bytes']/res['disk_write_s']/1e9:>10.2f}")
    print(f"stream / disk-write time: {s['wall_s']/res['disk_write_s']:.2f}x")
    if "transformers" in res:
        t = res["transformers"]
        print(f"transformers / stream: time {t['wall_s']/s['wall_s']:.2f}x, peak RSS {t['peak_rss_bytes']/s['peak_rss_bytes']:.2f}x")
    return res


def bench_marginal(a) -> dict:
    """Fixed + per-layer model: t(L) = fixed + L * per_layer, for the converter and for the disk."""
    lo, hi = (int(x) for x in a.layers.split(","))
    runs = {}
    for n in (lo, hi):
        runs[n] = bench_e2e(argparse.Namespace(**{**vars(a), "layers": n, "with_transformers": False}))
    d_layers = hi - lo
    per_layer = (runs[hi]["stream"]["wall_s"] - runs[lo]["stream"]["wall_s"]) / d_layers
    per_layer_bytes = (runs[hi]["output_bytes"] - runs[lo]["output_bytes"]) / d_layers
    disk_rate = (runs[lo]["output_bytes"] + runs[hi]["output_bytes"]) / (runs[lo]["disk_write_s"] + runs[hi]["disk_write_s"])
    fixed = runs[lo]["stream"]["wall_s"] - lo * per_layer
    rest_bytes = runs[lo]["output_bytes"] - lo * per_layer_bytes      # embeddings, lm_head, side files
    total_bytes = rest_bytes + 36 * per_layer_bytes
    t120 = fixed + 36 * per_layer
    disk120 = total_bytes / disk_rate
    res = {"runs": runs, "per_layer_s": per_layer, "per_layer_bytes": per_layer_bytes, "fixed_s": fixed,
           "disk_bytes_per_s": disk_rate, "projected_120b_s": t120, "projected_120b_disk_s": disk120,
           "projected_ratio": t120 / disk120}
    print(f"\nper extra layer: {per_layer:.2f} s for {per_layer_bytes/1e9:.2f} GB "
          f"({per_layer_bytes/per_layer/1e9:.2f} GB/s); disk alone {disk_rate/1e9:.2f} GB/s "
          f"-> per-layer ratio {per_layer / (per_layer_bytes / disk_rate):.2f}x")
    print(f"fixed part (start-up, imports, embeddings + lm_head): {fixed:.1f} s")
    print(f"gpt-oss-120b: {fixed:.1f} + 36 x {per_layer:.2f} = {t120:.0f} s vs writing "
          f"{total_bytes/1e9:.0f} GB at {disk_rate/1e9:.2f} GB/s = {disk120:.0f} s -> {t120/disk120:.2f}x")
    return res


def bench_decode(a) -> dict:
    import torch
    import triton.testing
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    import compress_gptoss as cg
    assert torch.cuda.is_available(), "decode bench needs a CUDA GPU"
    g = torch.Generator(device="cuda").manual_seed(0)
    E, O, G = 128, 5760, 90
    blocks = torch.randint(0, 256, (E, O, G, 16), dtype=torch.uint8, device="cuda", generator=g)
    scales = torch.randint(0, 255, (E, O, G), dtype=torch.uint8, device="cuda", generator=g)
    ours = cg.decode_mxfp4_to(blocks, scales, torch.bfloat16)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    exact = torch.equal(ours.view(torch.int16), ref.view(torch.int16))
    del ref
    moved = blocks.numel() + scales.numel() + ours.numel() * 2          # bytes in + out
    sweep = {}
    for cfg in [(64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8),
                (32, 256, 4), (64, 512, 8)]:
        out = cg.decode_mxfp4_to(blocks, scales, torch.bfloat16, config=cfg)
        ok = torch.equal(out.view(torch.int16), ours.view(torch.int16))
        del out
        t = triton.testing.do_bench(lambda: cg.decode_mxfp4_to(blocks, scales, torch.bfloat16, config=cfg),
                                    warmup=50, rep=300, return_mode="median") / 1e3
        sweep[str(cfg)] = {"s": t, "tb_s": moved / t / 1e12, "exact": ok}
        print(f"  config BLOCK_O, BLOCK_K, warps = {cfg}: {t*1e3:.2f} ms, {moved/t/1e12:.2f} TB/s, exact {ok}")
    t_ours = triton.testing.do_bench(lambda: cg.decode_mxfp4_to(blocks, scales, torch.bfloat16),
                                     warmup=100, rep=1000, return_mode="median") / 1e3
    t_tf = triton.testing.do_bench(lambda: convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16),
                                   warmup=100, rep=2000, return_mode="median") / 1e3
    big = torch.empty(4 << 30, dtype=torch.uint8, device="cuda").random_(0, 255, generator=g)
    t_copy = triton.testing.do_bench(lambda: big.clone(), warmup=50, rep=500, return_mode="median") / 1e3
    copy_bw = 2 * big.numel() / t_copy
    res = {"shape": [E, O, G, 16], "bit_identical": exact, "bytes_moved": moved,
           "ours_s": t_ours, "transformers_s": t_tf, "copy_bw": copy_bw,
           "gpu": torch.cuda.get_device_name(), "sweep": sweep, "default_config": cg.MXFP4_KERNEL_CONFIG}
    print(f"\n{res['gpu']}: decode of one gpt-oss-120b gate_up ({blocks.numel()/1e9:.2f} GB of blocks), "
          f"bit-identical to transformers: {exact}")
    print(f"{'decoder':<26}{'ms':>9}{'TB/s (in+out)':>15}")
    print(f"{'transformers':<26}{t_tf*1e3:>9.2f}{moved/t_tf/1e12:>15.3f}")
    print(f"{'compress_gptoss (triton)':<26}{t_ours*1e3:>9.2f}{moved/t_ours/1e12:>15.3f}")
    print(f"{'device copy':<26}{'':>9}{copy_bw/1e12:>15.3f}")
    print(f"speed-up vs transformers: {t_tf/t_ours:.1f}x; {moved/t_ours/copy_bw:.0%} of copy bandwidth")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["e2e", "decode", "marginal"])
    ap.add_argument("--layers", default="1", help="e2e: a count; marginal: two counts, e.g. 1,3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--with-transformers", action="store_true")
    ap.add_argument("--work", default="/tmp/gptoss-bench")
    ap.add_argument("--out", help="write the figures here as JSON")
    a = ap.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.what == "e2e":
        a.layers = int(a.layers)
    res = {"e2e": bench_e2e, "decode": bench_decode, "marginal": bench_marginal}[a.what](a)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
