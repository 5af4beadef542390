"""quantize --experts mxfp4: OpenAI's own MXFP4 layout written back from BF16.

The encoder is checked against a float64 reference of the OCP MX rule written here; the checkpoints
against the fixture's MXFP4 files (written by tests/tiny_gptoss.py, not by the tool) and against
transformers' own MXFP4 decoder (convert_moe_packed_tensors, Mxfp4Config(dequantize=True)).
"""
import json
import math
import re

import pytest
import torch
from safetensors import safe_open

import compress_gptoss as cg
import tiny_gptoss
from conftest import run_cli
from test_quantize import bad, quality


def tensors(folder) -> dict:
    """Every tensor as the files hold it, by its stored name (OpenAI's MXFP4 layout is read as it is)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# E2M1 code of twice a code's value, for magnitudes up to 3 (0.5 -> 1, 1 -> 2, 1.5 -> 3, 2 -> 4, 3 -> 6)
DOUBLED_CODE = torch.tensor([0, 2, 4, 5, 6, 7, 0, 0, 8, 10, 12, 13, 14, 15, 0, 0], dtype=torch.uint8)
EXPERT_BLOCKS_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")


# ---------------------------------------------------------------- an independent reference of the OCP rule


def ocp_reference(block: list) -> tuple[list, int]:
    """32 floats -> (32 E2M1 codes, E8M0 byte), in float64: shared exponent floor(log2(amax)) - 2
    (0 bytes for an all-zero block), each value to the nearest E2M1 magnitude, ties to the even code,
    beyond 6 to 6 (the nearest), the sign bit from the value's sign (-0.0 included)."""
    amax = max(abs(x) for x in block)
    if amax == 0:
        e = -127
    else:
        e = min(127, max(-127, math.frexp(amax)[1] - 1 - 2))
    codes = []
    for x in block:
        v = abs(x) / 2.0 ** e
        k = min(range(8), key=lambda i: (abs(v - FP4_MAGNITUDES[i]), i % 2))
        codes.append(k | (8 if math.copysign(1.0, x) < 0 else 0))
    return codes, e + 127


def reference_encode(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, K] -> (blocks [rows, K/32, 16], scales [rows, K/32]) by ocp_reference, packed low nibble first."""
    rows = values.double().reshape(-1, 32).tolist()
    codes, scales = zip(*(ocp_reference(r) for r in rows))
    c = torch.tensor(codes, dtype=torch.uint8).reshape(*values.shape[:-1], -1, 32)
    return c[..., 0::2] | (c[..., 1::2] << 4), torch.tensor(scales, dtype=torch.uint8).reshape(*values.shape[:-1], -1)


def transformers_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[rows, G, 16] + [rows, G] -> [rows, G*32] by transformers' own MXFP4 decoder (float32)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    return convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0].T


def edge_blocks() -> torch.Tensor:
    """Blocks of 32 that hit every branch: ties, saturation, zeros, signed zeros, extremes."""
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    ties = [4.0] + mids + [-m for m in mids] + [0.0, -0.0] + [0.1, 0.3, 0.6, 0.9, 1.1, 1.4, 1.6, 2.2, 2.8, 3.2,
                                                             4.6, 5.4, -5.6, -0.2, 0.05]
    blocks = [ties, [x * 2.0 ** -9 for x in ties], [x * 2.0 ** 20 for x in ties],
              [7.99, 7.0, 6.5, 6.01, -7.5, 5.01, 4.99] + [0.5] * 25,                 # saturation at 6 x 2^0
              [8.0, -8.0, 1.0, 0.4] + [0.0] * 28,                                    # amax a power of two
              [0.0] * 32, [-0.0] * 32, [-0.0, 0.0] * 16,
              [2.0 ** -130, -2.0 ** -131, 2.0 ** -133] + [0.0] * 29,                 # below E8M0's smallest scale
              [2.0 ** 100, -(2.0 ** 99) * 1.75] + [2.0 ** 97] * 30]
    assert all(len(b) == 32 for b in blocks)
    return torch.tensor(blocks, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_matches_the_float64_ocp_reference(dtype):
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(64, 8 * 32, generator=g) * torch.exp2(torch.randint(-12, 12, (64, 1), generator=g).float())
    for values in (edge_blocks(), rnd):
        values = values.to(dtype)
        blocks, scales = cg.encode_mxfp4_blocks(values)
        ref_blocks, ref_scales = reference_encode(values)
        assert torch.equal(scales, ref_scales)
        assert torch.equal(blocks, ref_blocks)
    # the tie and saturation rows, spelled out: 4 | ties go to the even code | 7.99 -> 6
    b, s = cg.encode_mxfp4_blocks(edge_blocks()[[0, 3]])
    codes = torch.stack([b & 15, b >> 4], -1).reshape(2, -1)
    assert s.tolist() == [[127], [127]]
    assert codes[0, :8].tolist() == [6, 0, 2, 2, 4, 4, 6, 6]
    assert codes[1, :7].tolist() == [7, 7, 7, 7, 15, 7, 6]


def test_encoder_inverts_transformers_decoder():
    """Random canonical MXFP4 bytes (largest code of each block 4 or 6, as the OCP rule writes them)
    -> transformers' decoder -> our encoder: the same bytes. Any block: the same values."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (48, 6, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (48, 6), generator=g, dtype=torch.uint8)
    for canonical in (True, False):
        b = blocks.clone()
        if canonical:
            b[..., 0] = (b[..., 0] & 0xF0) | torch.randint(6, 8, b[..., 0].shape, generator=g, dtype=torch.uint8)
        values = transformers_decode(b, scales).to(torch.bfloat16)
        b2, s2 = cg.encode_mxfp4_blocks(values)
        assert torch.equal(transformers_decode(b2, s2).to(torch.bfloat16), values)
        if canonical:
            assert torch.equal(b2, b) and torch.equal(s2, scales)


def test_encoder_refuses_non_finite_values():
    with pytest.raises(ValueError, match="inf or NaN"):
        cg.encode_mxfp4_blocks(torch.tensor([[float("inf")] + [0.0] * 31]))


# ---------------------------------------------------------------- the round trip through the CLI


@pytest.fixture(scope="session")
def rtn_mxfp4(quantized, tiny_bf16):
    r, out = quantized("rtn-mxfp4", tiny_bf16, "--experts", "mxfp4", "--algo", "rtn", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def max_magnitude_code(blocks: torch.Tensor) -> torch.Tensor:
    return torch.maximum((blocks & 7).amax(-1), ((blocks >> 4) & 7).amax(-1))


def test_rtn_round_trip_gives_the_source_back(rtn_mxfp4, tiny_mxfp4):
    """fixture MXFP4 -> dequantize -> quantize --experts mxfp4 --algo rtn: every expert value equal,
    every other tensor bitwise equal, OpenAI's quantization_config. The fixture's encoder picks the
    scale 2^ceil(log2(amax/6)) (triton_kernels' round-up rule), which leaves the largest code at 3 in
    some blocks; the OCP rule writes those same values with the scale one lower and the codes
    doubled. Every other block comes back byte for byte."""
    out, r = rtn_mxfp4
    assert "never loaded whole" in r.stderr
    src, got = tensors(tiny_mxfp4), tensors(out)
    assert set(got) == set(src)
    for name, t in src.items():
        if not EXPERT_BLOCKS_RE.match(name):
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    canonical = changed = 0
    for name in (n for n in src if n.endswith("_blocks")):
        base = name[: -len("_blocks")]
        b, s, b2, s2 = src[name], src[base + "_scales"], got[name], got[base + "_scales"]
        assert b2.dtype == s2.dtype == torch.uint8 and b2.shape == b.shape and s2.shape == s.shape
        e, o, g, _ = b.shape
        assert torch.equal(transformers_decode(b2.reshape(-1, g, 16), s2.reshape(-1, g)),
                           transformers_decode(b.reshape(-1, g, 16), s.reshape(-1, g)))
        ocp = max_magnitude_code(b) >= 6                               # largest value 4 or 6: OCP's own scale
        assert torch.equal(b2[ocp], b[ocp]) and torch.equal(s2[ocp], s[ocp])
        assert torch.equal(s2[~ocp], s[~ocp] - 1)
        lo, hi = (b[~ocp] & 15).long(), (b[~ocp] >> 4).long()
        assert torch.equal(b2[~ocp], DOUBLED_CODE[lo] | (DOUBLED_CODE[hi] << 4))
        canonical += int(ocp.sum())
        changed += int((~ocp).sum())
    assert canonical > 0 and changed > 0       # both kinds of block were exercised
    config = json.loads((out / "config.json").read_text())
    fixture_config = json.loads((tiny_mxfp4 / "config.json").read_text())
    assert config["quantization_config"] == fixture_config["quantization_config"]
    q = quality(out)
    assert q["kl_mean"] == 0 and q["top1_agreement"] == 1 and q["quantized_fraction"]["experts"] == 1
    assert q["perplexity"]["quantized"] == q["perplexity"]["source"]
    assert "vLLM, SGLang, transformers, TensorRT-LLM and llama.cpp" in (out / "README.md").read_text()


def test_transformers_gives_the_source_logits(rtn_mxfp4, tiny_mxfp4):
    """transformers' own MXFP4 loader (dequantize=True) on the output and on the fixture: same logits."""
    out, _ = rtn_mxfp4
    ids = torch.tensor([[5, 17, 300, 42, 999, 3, 64, 128, 7, 700, 12, 513]])
    logits = []
    for folder in (tiny_mxfp4, out):
        model = cg.load_mxfp4_model(folder)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_output_dequantizes_to_the_bf16_input(rtn_mxfp4, tiny_bf16, tmp_path):
    """The output is a valid MXFP4 source for our own dequantize, which gives the BF16 input back."""
    out, _ = rtn_mxfp4
    r = run_cli("dequantize", "--src", out, "--dst", tmp_path / "again", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    a, b = tensors(tmp_path / "again"), tensors(tiny_bf16)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- GPTQ on a fine-tuned model


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_bf16, tmp_path_factory):
    """tiny_bf16 trained 20 more AdamW steps on the training texts: its experts are off the MXFP4 grid."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dst = tmp_path_factory.mktemp("finetuned") / "tiny-gptoss-ft-bf16"
    tok = AutoTokenizer.from_pretrained(tiny_bf16)
    model = AutoModelForCausalLM.from_pretrained(tiny_bf16, dtype=torch.float32)
    ids = []
    for text in tiny_gptoss.split_corpus(tiny_gptoss.docstring_corpus())[0]:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    n = (len(ids) - 1) // 64
    data = torch.tensor(ids[: n * 64]).view(n, 64)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # bitwise the same fine-tune on every run (see tiny_gptoss.train_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(20):
        batch = data[torch.randint(0, n, (16,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.set_num_threads(threads)
    model.to(torch.bfloat16).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def test_finetuned_experts_are_off_the_mxfp4_grid(tiny_finetuned):
    with safe_open(str(tiny_finetuned / "model.safetensors"), framework="pt") as h:
        w = h.get_tensor("model.layers.0.mlp.experts.gate_up_proj").transpose(1, 2)
    rows = w.reshape(-1, 32).float()
    blocks, scales = reference_encode(rows)
    back = transformers_decode(blocks, scales)
    assert float((back == rows).all(-1).float().mean()) < 0.01      # (almost) no block is MXFP4 values


def test_gptq_beats_rtn_on_a_finetune(quantized, tiny_finetuned):
    runs = {a: quantized(f"ft-{a}-mxfp4", tiny_finetuned, "--experts", "mxfp4", "--algo", a) for a in ("rtn", "gptq")}
    for r, _ in runs.values():
        assert r.returncode == 0, r.stderr[-3000:]
    g, r = quality(runs["gptq"][1]), quality(runs["rtn"][1])
    assert g["perplexity"]["source"] == pytest.approx(r["perplexity"]["source"], rel=1e-6)
    print(f"KL GPTQ-MXFP4 {g['kl_mean']:.5f}, RTN-MXFP4 {r['kl_mean']:.5f}: ratio {g['kl_mean'] / r['kl_mean']:.3f}")
    assert g["kl_mean"] <= 0.7 * r["kl_mean"], (g["kl_mean"], r["kl_mean"])
    out = runs["gptq"][1]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    t = tensors(out)
    assert not [k for k in t if "weight_packed" in k or "weight_scale" in k or re.search(r"experts\.\d+\.", k)]
    assert "mapped exactly" in runs["gptq"][0].stderr and (out / "recipe.yaml").exists()


# ---------------------------------------------------------------- what is refused


@pytest.mark.parametrize("flags, message", [
    (["--experts", "mxfp4", "--algo", "awq"], r"--experts mxfp4 --algo awq: .*rtn.*gptq"),
    (["--experts", "mxfp4", "--group-size", "64"], r"--experts mxfp4 --group-size 64: an MXFP4 block is 32"),
    (["--experts", "mxfp4a4"], r"--experts mxfp4 with --experts mxfp4a4: MXFP4 experts are weight-only"),
    (["--experts-type", "mxfp4", "--experts-scheme", "w4a8"], r"with --experts-scheme w4a8: .*weight-only"),
    (["--experts", "mxfp4", "--mw", "w4a16"], r"with --mw: no engine loads"),
    (["--experts", "mxfp4", "--with-sparse"], r"with --with-sparse: OpenAI's layout fixes"),
])
def test_bad_mxfp4_flags(flags, message, tiny_bf16, calib_jsonl, tmp_path, capsys):
    errors, err = bad(["--model-in", tiny_bf16, "--calib-jsonl", calib_jsonl, *flags], tmp_path, capsys)
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert not any("Traceback" in line for line in err)


def test_mxfp4_dry_run_and_other_models(tiny_bf16, tiny_llama, calib_jsonl, tmp_path, capsys):
    rc = cg.main(["quantize", "--model-in", str(tiny_bf16), "--calib-jsonl", str(calib_jsonl), "--experts", "mxfp4",
                  "--algo", "rtn", "--group-size", "32", "--dry-run"])
    printed = capsys.readouterr().out
    assert rc == 0 and "output dir: tiny-gptoss-RTN-experts-mxfp4" in printed
    assert re.search(r"experts\s+RTN\s+MXFP4A16\s+24 modules.*24 x g32", printed) and "recipe:   none" in printed
    assert "\nmw " not in printed
    errors, _ = bad(["--model-in", tiny_llama, "--calib-jsonl", calib_jsonl, "--experts", "mxfp4"], tmp_path, capsys)
    assert len(errors) == 1 and "OpenAI's MXFP4 layout is GPT-OSS's" in errors[0]


# ---------------------------------------------------------------- the bench starts here too


def test_bench_runs_at_tiny_dims_and_rejects_bad_args(tmp_path, capsys):
    import importlib.util
    import subprocess
    import sys
    path = cg.Path(__file__).resolve().parent.parent / "bench" / "bench_mxfp4_export.py"
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(path), "--device", "cpu", "--experts", "2", "--hidden", "64",
                        "--intermediate", "96", "--iters", "1", "--gptq", "--tokens", "64", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert json.loads(r.stdout) == res and res["values"] == 2 * (64 * 192 + 96 * 64)
    assert res["rules"]["values_equal_where_same_scale"] and 0 < res["rules"]["same_scale_fraction"] <= 1
    assert {"ours", "ct_rtn", "gptq"} <= set(res)
    spec = importlib.util.spec_from_file_location("bench_mxfp4_export", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bad_runs = [(["--hidden", "33"], 2, "multiple of 32"), (["--experts", "0"], 2, "give 1 or more")]
    if not torch.cuda.is_available():
        bad_runs.append((["--device", "cuda"], 3, "needs a CUDA GPU"))
    for argv, code, message in bad_runs:
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == code and message in capsys.readouterr().err, argv


def test_nan_in_the_experts_is_one_line(tiny_bf16, calib_jsonl, tmp_path, capsys):
    import shutil
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken-bf16"
    shutil.copytree(tiny_bf16, broken)
    shard = next(f for f in sorted(broken.glob("*.safetensors"))
                 if any(k.endswith("gate_up_proj") for k in load_file(str(f))))
    t = load_file(str(shard))
    name = next(k for k in t if k.endswith("gate_up_proj"))
    t[name][1, 0, 0] = float("nan")
    save_file(t, str(shard), metadata={"format": "pt"})
    errors, err = bad(["--model-in", broken, "--calib-jsonl", calib_jsonl, "--experts", "mxfp4", "--algo", "rtn",
                       "--no-eval"], tmp_path, capsys)
    assert len(errors) == 1 and f"{name} (experts 0-3): inf or NaN" in errors[0], err
