#!/usr/bin/env python3
"""quantize at gpt-oss-120b scale: a checkpoint with the real layer dimensions but few layers.

  python bench/bench_quantize_scale.py --layers 1 --samples 64 --seq-len 512 [--compare] [--out res.json]

Builds (or reuses) random MXFP4 codes with gpt-oss-120b's dimensions, runs the real `dequantize`
and then `quantize` (GPTQ W4A16 experts + attention) as subprocesses, and samples while each runs:
peak host RSS of the process tree (psutil), peak GPU memory in use (nvidia-smi), wall time, and
the disk used by the offload folder. Prints the per-layer figures and the projection to 36 layers
(120b) and 24 layers (20b) with the arithmetic.

--compare-nproc N runs the default quantize again under torchrun with N processes (one GPU each)
and compares its wall time, pass times and int4 codes with the one-process run.

--compare runs quantize on the same checkpoint as "llmcompressor" (--per-expert-calibration
--no-share-hessians --propagate-all-experts --fp32-hessian-matmul: llmcompressor 0.14 as it comes),
"per_expert" (--per-expert-calibration: shared Hessians, tensor-core Hessian matmuls and routed
propagation through llmcompressor's hooked expert modules, the default before the batched path),
the defaults (batched expert calibration) and, with --cap SIZE, the defaults under
--max-gpu-memory SIZE ("capped"; 22GiB stands for a 24 GB card). It prints a table: wall time,
the decoder layer's step (calibration + GPTQ solve) and passes, peak GPU memory allocated
(torch.cuda.max_memory_allocated, from quantize's log) and the share of int4 codes equal to the
llmcompressor run's. --out FILE writes all of it as JSON.

--experts 32 builds gpt-oss-20b's dimensions instead; --drop-source deletes the MXFP4 source once
dequantized (a later run reuses the BF16 copy); --max-gpu-memory SIZE goes to every quantize run.
gpt-oss-20b dimensions end to end under a 24 GB card's budget (about 40 GB of BF16 on disk):
  python bench/bench_quantize_scale.py --layers 24 --experts 32 --samples 256 --seq-len 2048 \
      --drop-source --max-gpu-memory 22GiB

--oom-check runs quantize once more while a second process takes all but 2 GiB of the GPU as soon
as quantize has logged its memory plan: exit code, `error:` lines, a traceback or not, and what was
left behind in the work folder.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def dir_size(p: Path) -> int:
    """Bytes of the regular files (symlinks to the source shards not followed)."""
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.exists() else 0


def run_sampled(cmd: list, offload: Path | None = None) -> dict:
    import psutil
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "gpu_mib": 0, "offload": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                p = psutil.Process(proc.pid)
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak["rss"] = max(peak["rss"], rss)
            except psutil.Error:
                pass
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                peak["gpu_mib"] = max(peak["gpu_mib"], sum(int(x) for x in out.split()))
            except Exception:
                pass
            if offload:
                peak["offload"] = max(peak["offload"], dir_size(offload))
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    log = proc.stdout.read()
    proc.wait()
    stop.set()
    t.join()
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss": peak["rss"],
            "peak_gpu_mib": peak["gpu_mib"], "peak_offload_bytes": peak["offload"], "log_tail": log[-4000:],
            "passes": pass_times(log),
            "layers": re.findall(r"\] (step \d+/\d+ .* done .*)", log),
            "steps_s": [int(x) for x in re.findall(r"\] step \d+/\d+ \(.*?\) done in (\d+) s", log)],
            "gpu_allocated_bytes": gpu_bytes(log),
            "gpu_plan": re.findall(r"\] (GPU memory: budget .*)", log),
            "budget": re.findall(r"\] (RAM budget .*|weights: .* in RAM, .*)", log),
            "ranks": [line for line in log.splitlines() if "calibrated on" in line or "] joined " in line],
            "log_lines": [line for line in log.splitlines() if line.startswith("[gptoss ")]}   # ours, with times


def code_agreement(dir_a: Path, dir_b: Path) -> dict:
    """Share of equal int4 codes over every *.weight_packed tensor (8 nibbles per int32) of two
    quantize outputs, and the largest relative difference of their weight_scale tensors."""
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys() if k.endswith(("weight_packed", "weight_scale"))})
        return out
    ta, tb = tensors(dir_a), tensors(dir_b)
    assert set(ta) == set(tb) and ta, (dir_a, dir_b)
    equal = total = 0
    scale_rel = 0.0
    for k in ta:
        if k.endswith("weight_packed"):
            for shift in range(0, 32, 4):
                equal += int((((ta[k] >> shift) & 0xF) == ((tb[k] >> shift) & 0xF)).sum())
                total += ta[k].numel()
        else:
            x, y = ta[k].double(), tb[k].double()
            scale_rel = max(scale_rel, float(((x - y).abs() / y.abs().clamp_min(1e-30)).max()))
    return {"codes_equal": equal / total, "codes": total, "scale_max_rel": scale_rel}


def gpu_bytes(log: str) -> float | None:
    """quantize's 'GPU memory: peak 19.8 GB allocated' line, in bytes (None without a GPU)."""
    m = re.search(r"GPU memory: peak ([\d.]+) (B|KB|MB|GB|TB) allocated", log)
    return float(m.group(1)) * 1000 ** ["B", "KB", "MB", "GB", "TB"].index(m.group(2)) if m else None


def seconds(hms: str) -> int:
    return sum(int(x) * 60 ** i for i, x in enumerate(reversed(hms.split(":"))))


def pass_times(log: str) -> dict:
    """{"3/3 Calibrating": seconds, ...}: the elapsed time of each finished progress bar of the
    sequential pipeline (tqdm's '(i/n): Calibrating: 100%|...| 64/64 [01:44<00:00, ...]')."""
    out = {}
    for i, n, what, hms in re.findall(r"\((\d+)/(\d+)\): (Calibrating|Propagating): 100%\|[^|]*\| \d+/\d+ \[([\d:]+)<", log):
        out[f"{i}/{n} {what}"] = seconds(hms)
    return out


def long_calibration_jsonl(path: Path, samples: int, seq_len: int) -> Path:
    """samples texts that each fill seq_len tokens (the local tokenizer takes ~2.8 characters per
    token on this corpus; 3.5 x seq_len characters, truncated by quantize): the docstring corpus
    cycled, so every sample is seq_len tokens long like the seed's 2048-token calibration."""
    import tiny_gptoss
    train, _ = tiny_gptoss.split_corpus(tiny_gptoss.docstring_corpus())
    texts, i = [], 0
    for _ in range(samples):
        parts, n = [], 0
        while n < 3.5 * seq_len:
            parts.append(train[i % len(train)])
            n += len(parts[-1]) + 1
            i += 1
        texts.append(" ".join(parts))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def oom_check(quantize: list, out: Path) -> dict:
    """What a user sees when another process takes the GPU after quantize planned its memory: a
    second process grabs all but 2 GiB of the free GPU memory as soon as quantize logs its plan.
    Expected: exit 2, one `error:` line, no traceback, no output folder or temp folder left."""
    proc = subprocess.Popen(quantize + ["--num-calibration-samples", "32", "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, hog = [], None
    for line in proc.stdout:
        lines.append(line)
        if hog is None and "GPU memory: budget" in line:
            hog = subprocess.Popen([sys.executable, "-c", "import torch, time; f, _ = torch.cuda.mem_get_info(); "
                                    "x = torch.empty(f - 2 * 2**30, dtype=torch.uint8, device='cuda'); time.sleep(600)"])
    proc.wait()
    if hog:
        hog.kill()
    left = sorted(x.name for x in out.parent.iterdir() if out.name in x.name)
    return {"rc": proc.returncode, "traceback": any("Traceback" in line for line in lines),
            "error_lines": [line.strip() for line in lines if line.startswith("error:")], "left_behind": left}


def compare_table(res: dict, work: Path, out: Path, variants: list) -> None:
    """--compare: one row per run, codes against the llmcompressor run's."""
    ref = work / "quantize_llmcompressor"
    rows = [(k, work / k) for k in variants if k != "quantize_capped"] + [("quantize", out)] + \
        [(k, work / k) for k in variants if k == "quantize_capped"]
    print("\n| run | rc | wall s | decoder-layer step s | Calibrating / Propagating s | peak GPU allocated GiB "
          "| int4 codes equal to llmcompressor's | scales max rel. diff. |")
    print("|---|---|---|---|---|---|---|---|")
    for k, folder in rows:
        r = res[k]
        if not r["rc"] and not res["quantize_llmcompressor"]["rc"]:
            r["codes_vs_llmcompressor"] = code_agreement(folder, ref) if folder != ref else None
        c = r.get("codes_vs_llmcompressor")
        layer = [v for s, v in r["passes"].items() if not s.startswith("1/")]
        gib = r["gpu_allocated_bytes"] / 2 ** 30 if r["gpu_allocated_bytes"] else float("nan")
        codes = "(reference)" if folder == ref else f"{c['codes_equal']:.4%}" if c else "-"
        scales = f"{c['scale_max_rel']:.1e}" if c else ""
        name = k.replace("quantize_", "") if k != "quantize" else "batched (default)"
        print(f"| {name} | {r['rc']} | {r['wall_s']:.1f} | {r['steps_s'][1:] or '-'} "
              f"| {' / '.join(map(str, layer)) or '-'} | {gib:.1f} | {codes} | {scales} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--work", default="/tmp/gptoss-bench")
    ap.add_argument("--experts", type=int, default=128, help="experts per layer: 128 (gpt-oss-120b), 32 (gpt-oss-20b)")
    ap.add_argument("--drop-source", action="store_true",
                    help="delete the random MXFP4 source once dequantized (24 layers of 20b dims fit a 64 GB disk)")
    ap.add_argument("--max-cpu-memory", help="pass to quantize (RAM budget for weights, e.g. 4GB)")
    ap.add_argument("--max-gpu-memory", metavar="SIZE", help="pass to every quantize run (e.g. 22GiB: a 24 GB card)")
    ap.add_argument("--compare", action="store_true",
                    help="quantize as llmcompressor comes, per-expert calibration (the old default) and the batched "
                         "default (+ --cap): times, peak GPU memory, int4 codes equal")
    ap.add_argument("--cap", metavar="SIZE", help="with --compare: the defaults again under --max-gpu-memory SIZE (this one, for that run)")
    ap.add_argument("--compare-batch", type=int, metavar="N",
                    help="quantize twice: defaults (one sample per forward), then --calib-batch-size N")
    ap.add_argument("--compare-nproc", type=int, metavar="N",
                    help="after the defaults, the same quantize under torchrun --nproc_per_node N (a GPU each): "
                         "wall time and int4 codes against the one-process run")
    ap.add_argument("--profile", metavar="FILE",
                    help="run the default quantize under cProfile: stats to FILE, the top functions to stdout")
    ap.add_argument("--oom-check", action="store_true",
                    help="also run quantize while another process takes the GPU (see oom_check)")
    ap.add_argument("--out")
    a = ap.parse_args()
    import tiny_gptoss
    work = Path(a.work)
    dims = "gptoss120b" if a.experts == 128 else "gptoss20b" if a.experts == 32 else f"gptoss-{a.experts}experts"
    src, bf16 = work / f"{dims}-dims-{a.layers}L-mxfp4", work / f"{dims}-dims-{a.layers}L-bf16"
    cli = [sys.executable, str(ROOT / "compress_gptoss.py")]
    res = {"layers": a.layers, "experts": a.experts, "samples": a.samples, "seq_len": a.seq_len}
    done = work / f"{bf16.name}.complete"     # written by this script once dequantize finished
    if a.drop_source and not src.exists() and done.exists():
        res["dequantize"] = {"rc": 0, "wall_s": 0.0, "peak_rss": 0, "peak_gpu_mib": 0, "peak_offload_bytes": 0,
                             "log_tail": "reused", "passes": {}}      # an earlier --drop-source run's BF16 copy
    else:
        if not (src / "config.json").exists():
            tiny_gptoss.build_random(src, tiny_gptoss.TinySpec(**{**tiny_gptoss.asdict(tiny_gptoss.TinySpec()),
                                                                **tiny_gptoss.GPTOSS_120B_LAYER, "experts": a.experts,
                                                                "layers": a.layers, "train_steps": 0}))
        res["dequantize"] = run_sampled(cli + ["dequantize", "--src", str(src), "--dst", str(bf16), "--overwrite"])
        if a.drop_source and not res["dequantize"]["rc"]:
            done.touch()
            shutil.rmtree(src)
    calib = long_calibration_jsonl(work / f"calib-{a.samples}x{a.seq_len}.jsonl", a.samples + 64, a.seq_len)  # 64 held out
    offload = work / "offload"
    out = work / "q-out"
    quantize = cli + ["quantize", "--model-in", str(bf16), "--experts", "w4a16", "--mw", "w4a16",
                      "--calib-jsonl", str(calib), "--num-calibration-samples", str(a.samples),
                      "--max-seq-length", str(a.seq_len), "--output-dir", str(out),
                      "--overwrite", "--no-eval", "--offload-folder", str(offload)]
    if a.max_gpu_memory:
        quantize += ["--max-gpu-memory", a.max_gpu_memory]
        res["max_gpu_memory"] = a.max_gpu_memory
    if a.max_cpu_memory:
        quantize += ["--max-cpu-memory", a.max_cpu_memory]
        res["max_cpu_memory"] = a.max_cpu_memory
    variants = {"quantize_llmcompressor": ["--per-expert-calibration", "--no-share-hessians", "--propagate-all-experts",
                                           "--fp32-hessian-matmul"],
                "quantize_per_expert": ["--per-expert-calibration"]} if a.compare else {}
    if a.compare and a.cap:
        variants["quantize_capped"] = ["--max-gpu-memory", a.cap]
    if a.compare_batch:
        variants[f"quantize_batch{a.compare_batch}"] = ["--calib-batch-size", str(a.compare_batch)]
    for k, flags in variants.items():
        res[k] = run_sampled(quantize + flags + ["--output-dir", str(work / k)], offload=offload)
    if a.profile:   # the same command under cProfile (its overhead inflates Python-heavy parts)
        quantize = [sys.executable, "-m", "cProfile", "-o", a.profile] + quantize[1:]
    res["quantize"] = run_sampled(quantize, offload=offload)
    if a.profile and Path(a.profile).exists():
        import pstats
        for key in ("cumulative", "tottime"):
            print(f"\n== cProfile of quantize, top 35 by {key}")
            pstats.Stats(a.profile).sort_stats(key).print_stats(35)
    res["output_bytes"] = dir_size(out)
    nproc = f"quantize_nproc{a.compare_nproc}" if a.compare_nproc else None
    if nproc:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.compare_nproc)]
        res[nproc] = run_sampled(torchrun + quantize[1:] + ["--output-dir", str(work / nproc)], offload=offload)
        if not res["quantize"]["rc"] and not res[nproc]["rc"]:
            res[f"codes_{nproc}_vs_defaults"] = code_agreement(work / nproc, out)
            r = res[f"codes_{nproc}_vs_defaults"]
            print(f"\nint4 codes equal, {a.compare_nproc} processes vs 1: {r['codes_equal']:.4%}; "
                  f"scales: max relative difference {r['scale_max_rel']:.2e}")
    batched = f"quantize_batch{a.compare_batch}"
    if a.compare_batch and not res["quantize"]["rc"] and not res[batched]["rc"]:
        res["codes_batch_vs_defaults"] = code_agreement(work / batched, out)
        print(f"\nint4 codes equal, batch {a.compare_batch} vs batch 1: {res['codes_batch_vs_defaults']['codes_equal']:.4%}; "
              f"scales: max relative difference {res['codes_batch_vs_defaults']['scale_max_rel']:.2e}")
    if a.compare:
        compare_table(res, work, out, list(variants))
    for k in ["dequantize", *variants, "quantize", *([nproc] if nproc else [])]:
        r = res[k]
        print(f"\n== {k}: rc {r['rc']}, wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss']/2**30:.1f} GiB, "
              f"peak GPU {r['peak_gpu_mib']/1024:.1f} GiB, offload {r['peak_offload_bytes']/2**30:.1f} GiB")
        if r["rc"]:
            print(r["log_tail"])
        for line in r.get("budget", []) + r.get("layers", []):
            print("   " + line)
        if r.get("passes"):
            print("   " + ", ".join(f"{k} {v} s" for k, v in r["passes"].items()))
    d = res["quantize"]
    for k in variants:
        p = res[k]
        if p["rc"] or d["rc"]:
            continue
        print(f"\n{k} / defaults: wall {p['wall_s']:.0f} s / {d['wall_s']:.0f} s = {p['wall_s'] / d['wall_s']:.2f}x")
        for step in p["passes"]:
            if d["passes"].get(step):
                print(f"  {step}: {p['passes'][step]} s / {d['passes'][step]} s = {p['passes'][step] / d['passes'][step]:.2f}x")
    if nproc and not res[nproc]["rc"] and not d["rc"]:
        p = res[nproc]
        print(f"\n1 process / {a.compare_nproc}: wall {d['wall_s']:.0f} s / {p['wall_s']:.0f} s = {d['wall_s'] / p['wall_s']:.2f}x")
        for step in d["passes"]:
            if p["passes"].get(step):
                print(f"  {step}: {d['passes'][step]} s / {p['passes'][step]} s = {d['passes'][step] / p['passes'][step]:.2f}x")
        for line in p["ranks"]:
            print("   " + line)
    q = res["quantize"]
    if not q["rc"]:
        per_layer = q["wall_s"] / a.layers   # an upper bound: load, save and the embeddings are included
        print(f"\nprojection (upper bound, whole run / layers; {a.samples} x {a.seq_len} calibration tokens):")
        for name, n in (("gpt-oss-120b", 36), ("gpt-oss-20b (32 experts: ~1/4 of the expert work)", 24)):
            print(f"  {name}: {n} layers x {per_layer:.0f} s = {n * per_layer / 60:.0f} min")
        print(q["log_tail"][-1500:])
    if a.oom_check:
        res["oom_check"] = oom_check(quantize, work / "oom-out")
        print("\nout-of-memory check:", json.dumps(res["oom_check"], indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
