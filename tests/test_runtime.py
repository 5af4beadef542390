"""install-kernel and verify-runtime on a machine without GPU (CI): the report and its exit codes,
--bench refusing politely, the bench's worker processes surviving failing cases, and the QQQ
install path with a local stand-in package (pip --no-deps: transformers' version must not move).
The stand-in goes to a temporary pip --target (PIP_TARGET), never into the shared venv."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import compress_gptoss as c
from conftest import ROOT, run_cli

pytestmark = pytest.mark.skipif(bool(c.cuda_gpus()), reason="these cover the no-GPU behaviour")


def test_verify_runtime_without_gpu_says_so_and_exits_0():
    r = run_cli("verify-runtime")
    assert r.returncode == 0, r.stderr
    for line in ("python ", "torch ", "driver ", "GPUs ", "nvcc ", "CUDA_VISIBLE_DEVICES=", "NVIDIA_VISIBLE_DEVICES=",
                 "transformers ", "llmcompressor ", "compressed-tensors ", "triton ", "W4A8 QQQ", "W4A8 built-in"):
        assert line in r.stdout, line
    assert "no CUDA GPU" in r.stdout


def test_verify_runtime_json():
    r = run_cli("verify-runtime", "--json")
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)
    assert env["gpus"] == [] and env["sanity"] == [] and env["ok"] is True
    assert env["packages"]["transformers"] and "compressed-tensors" in env["packages"]
    assert set(env["backends"]) == {"qqq", "builtin_triton"}
    assert env["backends"]["builtin_triton"]["runnable"] is False
    if env["packages"]["triton"]:
        assert "compute capability >= 8.0" in env["backends"]["builtin_triton"]["detail"]


@pytest.mark.parametrize("flag,needle", [("--require-gpu", "no CUDA GPU visible"),
                                         ("--require-w4a8", "no W4A8 GEMM can run here")])
def test_require_flags_fail_without_gpu(flag, needle):
    r = run_cli("verify-runtime", flag)
    assert r.returncode == 3
    assert needle in r.stdout
    r = run_cli("verify-runtime", flag, "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["problems"]


def test_bench_needs_a_gpu():
    r = run_cli("verify-runtime", "--bench", "--shapes", "gpt-oss")
    assert r.returncode == 3
    assert "needs a CUDA GPU" in r.stderr and r.stdout == ""
    for script in ("bench_w4a8.py", "bench_large_m.py", "bench_int4_eager.py", "bench_split_k.py", "bench_group_rescale.py"):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--out", "unused.json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 3 and "needs a CUDA GPU" in r.stderr, (script, r.stderr[-500:])
        assert not Path("unused.json").exists()



def test_split_k_bench_pairs_each_default_with_its_atomics():
    """bench_split_k.py times, for every GPT-OSS shape at M = 1 and 16 (both split K by default), the
    default config against the very same config with fp32 atomics, and against itself launched
    without programmatic dependent launch, each variant once per round."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_split_k", ROOT / "bench" / "bench_split_k.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    jobs = bench.jobs_for_round(c, 1, [1, 16], ["a8"], 64, "fp16")
    cases = {(j["shape"], j["M"]) for j in jobs}
    assert len(cases) == 2 * len(c.GPT_OSS_SHAPES)
    for shape, m in cases:
        by = {j["variant"]: j for j in jobs if (j["shape"], j["M"]) == (shape, m)}
        default = c.int4_gemm_config(m, by["linear"]["N"], by["linear"]["K"]).__dict__
        assert by["a8 slices"]["config"] == default and default["split_k"] > 1, (shape, m)
        assert by["a8 atomics"]["config"] == {**default, "split_stores": False}, (shape, m)
        assert by["a8 slices no PDL"]["config"] == {**default, "pdl": False} and default["pdl"], (shape, m)
        assert len(by) == len([j for j in jobs if (j["shape"], j["M"]) == (shape, m)])   # each once

def test_bench_cases_cover_gpt_oss_shapes():
    cases = c.bench_cases("gpt-oss", None, 4096, 4096)   # --M unset
    assert len(cases) == 25
    assert {(x["K"], x["N"]) for x in cases} == {(2880, 4096), (2880, 512), (4096, 2880), (2880, 5760), (2880, 2880)}
    assert {x["M"] for x in cases} == {1, 16, 64, 256, 1024}
    assert c.bench_cases(None, 16, 4096, 4096) == [{"shape": "4096->4096", "M": 16, "K": 4096, "N": 4096}]
    assert {x["M"] for x in c.bench_cases("gpt-oss", 1, 0, 0)} == {1} and len(c.bench_cases("gpt-oss", 1, 0, 0)) == 5
    assert c.bench_cases(None, None, 4096, 4096)[0]["M"] == 16   # --M unset


@pytest.mark.parametrize("dtype,tol", [("fp16", "1e-3"), ("bf16", "5e-3")])
def test_bench_report_survives_failing_workers(dtype, tol):
    """Without CUDA every case fails inside its worker: each row says why, the report is whole.
    --dtype bf16: the baseline is bf16 nn.Linear and the error bound bf16's."""
    rep = c.run_runtime_bench(c.bench_cases(None, 4, 256, 128), ["fp16", "w4a8"], 64, iters=3, check=False,
                              dtype=dtype)
    assert [r["backend"] for r in rep["results"]] == ["fp16", "w4a8"]
    assert all("error" in r for r in rep["results"]) and {r["dtype"] for r in rep["results"]} == {dtype}
    text = c.format_bench_report(rep)
    assert f"{dtype} nn.Linear" in text and "built-in W4A8 g64" in text and f"speedup vs {dtype} nn.Linear" in text
    assert rep["summary"][f"builtin_err<={tol}"] == "0/1"
    json.dumps(rep)


def test_bench_workers_run_the_callers_file(tmp_path, monkeypatch):
    """A copy of compress_gptoss.py elsewhere (a before/after comparison) runs its workers from
    itself, not from the `compress_gptoss` that the worker's sys.path would find first."""
    import importlib.util
    copy = tmp_path / "compress_gptoss_before.py"
    copy.write_text(Path(c.__file__).read_text() + "\n\ndef bench_worker():   # answers with its own file\n"
                    "    print('@@start ' + json.dumps({'id': 'who'}), flush=True)\n"
                    "    print('@@bench ' + json.dumps({'id': 'who', 'error': __file__}), flush=True)\n    return 0\n")
    spec = importlib.util.spec_from_file_location("compress_gptoss_before", copy)
    before = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compress_gptoss_before", before)   # dataclasses look their module up
    spec.loader.exec_module(before)
    res = before.run_bench_workers([{"id": "who", "label": "which file", "M": 1, "K": 8, "N": 8}], iters=1, graph=False)
    assert res["who"]["error"] == str(copy), res


def test_runtime_detection_helpers(monkeypatch):
    triton_ok = c.triton_status()[0]
    assert c.has_w4a8_runtime() == (triton_ok or c.qqq_status()[0])
    monkeypatch.setenv("_GPTOSS_TEST_NO_W4A8_RUNTIME", "1")
    assert c.has_w4a8_runtime() is False
    msg = c.w4a8_runtime_message()
    if triton_ok:
        assert "compute capability >= 8.0" in msg


# ---- install-kernel ----

def standin_wheel(dst: Path) -> Path:
    """A pure-Python wheel named QQQ whose metadata pins an old transformers (as QQQ's does)."""
    whl = dst / "QQQ-0.0.1-py3-none-any.whl"
    files = {
        "QQQ/_CUDA.py": "def qqq_gemm(*args):\n    raise RuntimeError('stand-in for tests')\n",
        "QQQ-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: QQQ\nVersion: 0.0.1\n"
                                        "Requires-Dist: transformers==4.45.0\nRequires-Dist: datasets==2.16.1\n",
        "QQQ-0.0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "QQQ-0.0.1.dist-info/top_level.txt": "QQQ\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "QQQ-0.0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("QQQ-0.0.1.dist-info/RECORD", record)
    return whl


def dist_version(name, env):
    code = f"import importlib.metadata as m\ntry: print(m.version({name!r}))\nexcept m.PackageNotFoundError: print('-')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip()


def test_install_kernel_standin_wheel_no_deps(tmp_path):
    target = tmp_path / "site"
    env = {**os.environ, "PIP_TARGET": str(target), "PYTHONPATH": str(target), "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    transformers_before = dist_version("transformers", env)
    assert transformers_before not in ("-", "4.45.0")
    whl = standin_wheel(tmp_path)
    r = run_cli("install-kernel", "--source", whl, "--yes", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--no-deps" in r.stderr and "self-test skipped: no CUDA GPU" in r.stderr
    assert dist_version("transformers", env) == transformers_before          # the --no-deps guarantee
    assert dist_version("datasets", env) != "2.16.1"
    assert dist_version("QQQ", env) == "0.0.1"
    assert (target / "QQQ" / "_CUDA.py").is_file() and not (target / "transformers").exists()
    env_json = json.loads(run_cli("verify-runtime", "--json", env=env).stdout)   # detection afterwards
    assert env_json["backends"]["qqq"]["importable"] is True
    assert env_json["packages"]["QQQ"] == "0.0.1"
    r = run_cli("install-kernel", env=env)   # already installed: no reinstall, says so
    assert r.returncode == 0 and "already installed" in r.stderr
    clean = {k: v for k, v in os.environ.items() if k not in ("PIP_TARGET", "PYTHONPATH")}
    assert dist_version("QQQ", clean) == "-"                                   # shared venv untouched


def test_install_kernel_asks_first(tmp_path):
    env = {**os.environ, "PIP_TARGET": str(tmp_path / "site"), "PIP_NO_INDEX": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "compress_gptoss.py"), "install-kernel", "--source",
                        standin_wheel(tmp_path)], input="n\n", capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "not confirmed" in r.stderr
    assert not (tmp_path / "site").exists()


def test_install_qqq_returns_false_when_it_cannot_build(tmp_path, monkeypatch, capsys):
    """quantize --try-install-qqq calls install_qqq and falls back on False: it must not raise."""
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    assert c.install_qqq(yes=True, source=str(tmp_path)) is False
    assert "cannot build QQQ here" in capsys.readouterr().err


def test_install_kernel_missing_toolchain(tmp_path):
    src = tmp_path / "QQQ"
    src.mkdir()
    (src / "setup.py").write_text("raise SystemExit('must not be built')\n")
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "no-cuda"), "PATH": str(Path(sys.executable).parent) + ":/bin"}
    r = run_cli("install-kernel", "--source", src, "--yes", env=env)
    assert r.returncode == 3, r.stderr
    assert "cannot build QQQ here; missing:" in r.stderr
    assert "nvcc" in r.stderr and "CUDA headers" in r.stderr
    assert "C++ compiler" in r.stderr or Path("/bin/c++").exists() or Path("/bin/g++").exists()
    import torch
    if not torch.version.cuda:
        assert "a CUDA build of torch" in r.stderr


# ---- verify-runtime --model (needs section 6's load_quantized_model and quantize's fixtures) ----

needs_loader = pytest.mark.skipif(not hasattr(c, "load_quantized_model"),
                                  reason="load_quantized_model (loader section) is not in this build")


@pytest.fixture(scope="module")
def w4a8_checkpoint(request, tiny_bf16):
    quantized = request.getfixturevalue("quantized")   # quantize's conftest
    r, out = quantized("rtn-w4a8-all", tiny_bf16, "--algo", "rtn", "--experts", "w4a8", "--mw", "w4a8", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_quantize_names_the_w4a8_runtime_once(quantized, tiny_bf16, w4a8_checkpoint):
    """Experts and the other weights are both W4A8 here: each is checked, the runtime named once."""
    r, _ = quantized("rtn-w4a8-all", tiny_bf16)   # the run behind w4a8_checkpoint
    assert r.stderr.count("W4A8 runtime: ") == 1, r.stderr[-3000:]


@needs_loader
def test_verify_model_without_gpu_runs_the_dense_fallback(w4a8_checkpoint):
    r = run_cli("verify-runtime", "--model", w4a8_checkpoint, "--new-tokens", "2", "--prefill-tokens", "16,48", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["device"] == "cpu" and rep["mode"].startswith("dense fallback")
    assert "kernels" not in rep and rep["dense"]["tokens_per_s"] > 0
    assert rep["bf16_source"].get("tokens_per_s")   # the source quantize recorded
    assert rep["prefill_tokens"] == [16, 48]
    assert rep["graph_decode"] == "skipped: a CUDA graph needs a CUDA GPU"
    for run in (rep["dense"], rep["bf16_source"]):
        assert sorted(run["prefill_tokens_per_s"]) == ["16", "48"] and min(run["prefill_tokens_per_s"].values()) > 0
        decode = run["decode_tokens_per_s_runs"]   # one generation's speed is noisy: the median of 3
        assert len(decode) == 3 and run["tokens_per_s"] == sorted(decode)[1], decode


@needs_loader
def test_verify_model_report_has_a_prefill_line_per_length(w4a8_checkpoint):
    r = run_cli("verify-runtime", "--model", w4a8_checkpoint, "--new-tokens", "2", "--prefill-tokens", "8,24")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines if ln.startswith("prefill")] == [["prefill", "8"], ["prefill", "24"]]
    assert any(ln.startswith("decode ") and "tokens/s" in ln for ln in lines)
    assert "decode graph    skipped: a CUDA graph needs a CUDA GPU" in lines


def test_prefill_tokens_rejects_a_bad_list():
    r = run_cli("verify-runtime", "--model", "/nonexistent", "--prefill-tokens", "128,many")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--prefill-tokens: '128,many' is not a comma list of token counts" in r.stderr.strip().splitlines()[-1]


@needs_loader
def test_a_missing_dependency_is_one_line_naming_it(w4a8_checkpoint):
    """verify-runtime --model on a machine without llmcompressor (the loader linearizes the experts
    with its classes): one line that names the package and requirements.txt, exit 3, no traceback."""
    code = ("import runpy, sys; sys.modules['llmcompressor'] = None; "   # import llmcompressor now fails
            f"sys.argv = ['compress_gptoss.py', 'verify-runtime', '--model', {str(w4a8_checkpoint)!r}]; "
            f"runpy.run_path({str(ROOT / 'compress_gptoss.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 3, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: this needs the Python package 'llmcompressor'") and "requirements.txt" in last, last


@needs_loader
def test_routed_experts_forward_is_llmcompressors_sum(w4a8_checkpoint):
    """routed_experts_forward (one sort, only the experts that got tokens) against llmcompressor's
    own LinearExperts2D.forward on the same decompressed model, in float64 so that only a wrong
    token, expert or weight could differ: a 2 x 24 batch (every expert used) and one token (2 of 4)."""
    import torch
    model = c.load_quantized_model(w4a8_checkpoint, decompress=True).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, shape, generator=g) for shape in ((2, 24), (1, 1))]
    with torch.no_grad():
        ref = [model(ids).logits for ids in batches]
        blocks = c.linearized_moe_blocks(model)
        assert len(blocks) == model.config.num_hidden_layers
        for b in blocks:
            b.forward = lambda h, i, w, b=b: c.routed_experts_forward(b, h, i, w)
        got = [model(ids).logits for ids in batches]
    for r, o in zip(ref, got):
        assert torch.allclose(o, r, rtol=1e-10, atol=1e-10), (o - r).abs().max()


@needs_loader
def test_verify_model_kernels_in_the_interpreter(w4a8_checkpoint):
    """The GPU path, run on the CPU by the Triton interpreter: every int4 Linear through the
    built-in W4A8 kernel, against the dense decompression of the same checkpoint (activations
    quantized by the same rule). Median KL per position, not the mean: on one training of the
    fixture a router near-tie flipped an expert at 1 of 40 positions (0.47 nats there, mean
    0.012; every module's output within bf16 rounding of the float64 reference); on another,
    mean 2.0e-4."""
    pytest.importorskip("triton")
    r = run_cli("verify-runtime", "--model", w4a8_checkpoint, "--new-tokens", "2", "--prefill-tokens", "0", "--json",
                env={"TRITON_INTERPRET": "1"})   # prefill timing off: the interpreter takes ~20 s per forward
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["kernels"]["w4a8"] >= 8 and rep["kernels"]["decompressed"] == 0
    assert rep["kernels"]["fused_gate_up"] == 4 * 2   # every expert of the tiny model (4 experts x 2 layers)
    assert rep["kernels"]["stacked_moe"] == 2          # each layer's experts in one int4_moe launch
    a = rep["agreement"]
    assert a["kl_median"] < 1e-3 and a["top1_agreement"] >= 0.9, a


def fake_qqq_tree(root: Path) -> Path:
    """A QQQ-shaped source tree: setup.py, and the one Python file the bench loads."""
    (root / "QQQ" / "gptq" / "qlinear").mkdir(parents=True)
    (root / "setup.py").write_text("raise SystemExit('not built in tests')\n")
    (root / "QQQ" / "gptq" / "__init__.py").write_text("raise ImportError('QQQ.gptq must not be imported')\n")
    (root / "QQQ" / "gptq" / "qlinear" / "qlinear_marlin.py").write_text(
        "from QQQ._CUDA import qqq_gemm\nclass QuantLinear:\n    pass\ndef mul(*args, **kw):\n    return qqq_gemm(*args)\n")
    return root


def test_qqq_python_layer_found_in_its_source_tree(tmp_path):
    """QQQ's setup.py installs only QQQ._CUDA; QuantLinear is read from the source tree
    ($QQQ_SOURCE or the one install-kernel recorded), without running QQQ/gptq/__init__."""
    site = tmp_path / "site" / "QQQ"
    site.mkdir(parents=True)
    (site / "_CUDA.py").write_text("def qqq_gemm(*a):\n    return 'stand-in'\n")
    tree = fake_qqq_tree(tmp_path / "src")
    code = ("import compress_gptoss as c; m = c.load_qqq_qlinear(); "
            "print(m.QuantLinear.__name__, m.mul())")
    env = {**os.environ, "PYTHONPATH": f"{site.parent}:{ROOT}", "QQQ_SOURCE": str(tree)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["QuantLinear", "stand-in"], r.stderr
    env.pop("QQQ_SOURCE")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")   # no record there either
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "set QQQ_SOURCE" in r.stderr


def test_qqq_source_archive_unpacked_once(tmp_path, monkeypatch):
    import tarfile
    tree = fake_qqq_tree(tmp_path / "QQQ-54c5c99")
    archive = tmp_path / "QQQ-54c5c99.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(tree, arcname=tree.name)
    monkeypatch.setattr(c, "QQQ_SOURCE_RECORD", tmp_path / "cache" / "qqq-source.json")
    got = c.qqq_source_tree(str(archive))
    assert got == tmp_path / "cache" / "qqq-src" / "QQQ-54c5c99"
    assert (got / "QQQ" / "gptq" / "qlinear" / "qlinear_marlin.py").is_file()
    assert c.qqq_source_tree(str(archive)) == got                  # cached
    assert c.qqq_source_tree(str(tree)) == tree.resolve()          # a directory is used as it is
    assert c.qqq_source_tree("git+https://example.invalid/QQQ") is None
