#!/usr/bin/env python3
"""Every quantize recipe on the tiny GPT-OSS (CPU): wall time, peak RSS, and quality beside RTN.

  python bench/bench_recipes.py [--samples 32 --seq-len 128] [--out recipes.json]

Runs `compress_gptoss.py quantize` as a subprocess per recipe on the trained tiny fixture
(tests/tiny_gptoss.py, dequantized once), with one shared calibration file and one held-out file,
and prints a table from each run's quality.json: KL(source||quantized), top-1 agreement, perplexity,
routing agreement, size.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

RECIPES = {
    "RTN W4A16 (baseline)": ["--algo", "rtn", "--experts", "w4a16", "--mw", "w4a16"],
    "GPTQ W4A16": ["--experts", "w4a16", "--mw", "w4a16"],
    "AWQ W4A16": ["--algo", "awq", "--experts", "w4a16", "--mw", "w4a16"],
    "RTN W8A8 (baseline)": ["--algo", "rtn", "--experts", "w8a8", "--mw", "w8a8"],
    "GPTQ W8A8": ["--experts", "w8a8", "--mw", "w8a8"],
    "GPTQ W4A8 experts + W4A16 rest": ["--experts", "w4a8", "--mw", "w4a16"],
    "2:4 + GPTQ W4A8 experts + W4A16 rest": ["--with-sparse", "--experts", "w4a8", "--mw", "w4a16"],
    "AWQ experts + GPTQ W8A8 rest": ["--experts-algo", "awq", "--experts", "w4a16", "--mw-algo", "gptq", "--mw", "w8a8"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", default="/tmp/gptoss-recipes")
    ap.add_argument("--only", help="comma list of recipe names (substring match)")
    ap.add_argument("--out")
    a = ap.parse_args()
    import tiny_gptoss
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, str(ROOT / "compress_gptoss.py")]
    bf16 = work / "tiny-gptoss-bf16"
    if not (bf16 / "config.json").exists():
        subprocess.run(cli + ["dequantize", "--src", str(tiny_gptoss.cached()), "--dst", str(bf16), "--overwrite"],
                       check=True, capture_output=True)
    calib = tiny_gptoss.corpus_jsonl(work / "calib.jsonl", "train")
    heldout = tiny_gptoss.corpus_jsonl(work / "heldout.jsonl", "heldout", limit=64)
    results = {}
    for name, flags in RECIPES.items():
        if a.only and not any(s.strip().lower() in name.lower() for s in a.only.split(",")):
            continue
        out = work / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        cmd = cli + ["quantize", "--model-in", str(bf16), *flags, "--calib-jsonl", str(calib),
                     "--eval-jsonl", str(heldout), "--num-calibration-samples", str(a.samples),
                     "--max-seq-length", str(a.seq_len), "--output-dir", str(out), "--overwrite",
                     "--allow-fallback"]
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/env", "python3", "-c",
                            "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
                            "print('child_maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
                            "file=sys.stderr); sys.exit(rc)", *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rss = int(re.search(r"child_maxrss_kb (\d+)", r.stderr).group(1)) * 1024
        if r.returncode:
            print(f"{name}: FAILED\n{r.stderr[-2000:]}", file=sys.stderr)
            results[name] = {"rc": r.returncode}
            continue
        q = json.loads((out / "quality.json").read_text())
        results[name] = {"wall_s": wall, "peak_rss": rss, "quality": q}
        print(f"done {name}: {wall:.0f} s", file=sys.stderr)
    print(f"\ntiny GPT-OSS, {a.samples} x {a.seq_len} calibration tokens, 64 held-out texts")
    print(f"{'recipe':<40}{'wall s':>8}{'RSS GB':>8}{'KL':>10}{'top-1':>8}{'ppl':>9}{'experts=':>10}{'MB':>7}")
    for name, r in results.items():
        if "quality" not in r:
            print(f"{name:<40} failed (rc {r['rc']})")
            continue
        q = r["quality"]
        print(f"{name:<40}{r['wall_s']:>8.0f}{r['peak_rss']/1e9:>8.2f}{q['kl_mean']:>10.5f}"
              f"{q['top1_agreement']:>8.3f}{q['perplexity']['quantized']:>9.3f}"
              f"{q.get('same_experts') or float('nan'):>10.3f}{q['size_bytes']['quantized']/1e6:>7.2f}")
    first = next((r["quality"] for r in results.values() if "quality" in r), None)
    if first:
        print(f"source: ppl {first['perplexity']['source']:.3f}, {first['size_bytes']['source']/1e6:.2f} MB")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
