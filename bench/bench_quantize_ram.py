#!/usr/bin/env python3
"""quantize under a RAM budget: does host memory stay flat as the model gets deeper?

  python bench/bench_quantize_ram.py --layers 2 4 --budget 150MB [--samples 4 --seq-len 32] [--out res.json]

Builds random MXFP4 checkpoints with scaled-down GPT-OSS layers (hidden 1024, 16 experts,
intermediate 1024: ~105 MB of BF16 per layer), dequantizes each with the CLI, then runs
`quantize` GPTQ W4A16 (--no-eval) twice per depth: with --max-cpu-memory BUDGET and with the whole
model in RAM (a budget larger than the model). Samples the process's RSS (total and anonymous)
every 0.2 s and reads it at each "layer k/N done" log line. Prints a table and the projection to
gpt-oss-120b.
"""
import argparse
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
SPEC = dict(hidden=1024, intermediate=1024, experts=16, top_k=4, heads=16, kv_heads=4, head_dim=64,
            vocab=2048, train_steps=0)


def anon_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def run_sampled(cmd: list) -> dict:
    import psutil
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    peak = {"rss": 0, "anon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak["rss"] = max(peak["rss"], psutil.Process(proc.pid).memory_info().rss)
                peak["anon"] = max(peak["anon"], anon_rss(proc.pid))
            except psutil.Error:
                pass
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    layers, log = [], []
    for line in proc.stderr:
        log.append(line)
        if re.search(r"layer \d+/\d+ done", line):
            layers.append({"t": round(time.perf_counter() - t0, 1), "anon_peak_so_far": peak["anon"],
                           "rss_peak_so_far": peak["rss"]})
    proc.wait()
    stop.set()
    t.join()
    text = "".join(log)
    m = re.search(r"weights: .*", text)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1), "peak_rss": peak["rss"],
            "peak_anon": peak["anon"], "per_layer": layers, "offload_line": m.group(0) if m else None,
            "log_tail": text[-3000:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--budget", default="150MB")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--work", default="/tmp/gptoss-bench-ram")
    ap.add_argument("--out")
    a = ap.parse_args()
    import tiny_gptoss
    work = Path(a.work)
    cli = [sys.executable, str(ROOT / "compress_gptoss.py")]
    calib = tiny_gptoss.corpus_jsonl(work / "calib.jsonl", "train")
    res = []
    for n in a.layers:
        src, bf16 = work / f"L{n}-mxfp4", work / f"L{n}-bf16"
        if not (src / "config.json").exists():
            tiny_gptoss.build_random(src, tiny_gptoss.TinySpec(**{**asdict(tiny_gptoss.TinySpec()), **SPEC, "layers": n}))
        if not (bf16 / "config.json").exists():
            subprocess.run(cli + ["dequantize", "--src", str(src), "--dst", str(bf16), "--device", "cpu"], check=True)
        size = sum(p.stat().st_size for p in bf16.glob("*.safetensors"))
        for budget in (a.budget, "100GB"):
            r = run_sampled(cli + ["quantize", "--model-in", str(bf16), "--experts", "w4a16", "--mw", "w4a16",
                                   "--calib-jsonl", str(calib), "--num-calibration-samples", str(a.samples),
                                   "--max-seq-length", str(a.seq_len), "--output-dir", str(work / "q"),
                                   "--overwrite", "--no-eval", "--max-cpu-memory", budget])
            r.update(layers=n, model_bytes=size, budget=budget)
            res.append(r)
            print(f"{n} layers ({size / 1e6:.0f} MB BF16), --max-cpu-memory {budget}: rc {r['rc']}, "
                  f"wall {r['wall_s']} s, peak RSS {r['peak_rss'] / 1e6:.0f} MB, peak anonymous "
                  f"{r['peak_anon'] / 1e6:.0f} MB; per layer anonymous peak so far (MB): "
                  f"{[round(x['anon_peak_so_far'] / 1e6) for x in r['per_layer']]}", flush=True)
            print(f"   {r['offload_line']}", flush=True)
            if r["rc"]:
                print(r["log_tail"])
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
