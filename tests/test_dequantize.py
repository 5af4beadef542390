"""dequantize: bit-exact against transformers' own MXFP4 decoder and loader, crash-safe, clear errors."""
import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import compress_gptoss as cg
from conftest import ROOT, run_cli


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats bit for bit (distinguishes -0.0 / 0.0, and NaN payloads)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def load_dir(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---------------------------------------------------------------- the decoder

@pytest.mark.parametrize("seed", [0, 1])
def test_decoder_bit_identical_to_transformers_on_random_codes(seed):
    g = torch.Generator().manual_seed(seed)
    E, out_f, G = 3, 40, 7
    blocks = torch.randint(0, 256, (E, out_f, G, 16), generator=g, dtype=torch.uint8)
    # every byte value, hence all 16 FP4 codes in both nibbles, appears
    blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    # scales over the whole finite E8M0 range: 2^-127 (subnormal in fp32) .. 2^127
    scales = torch.randint(0, 255, (E, out_f, G), generator=g, dtype=torch.uint8)
    scales.view(-1)[:255] = torch.arange(255, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.bfloat16)
    ours = cg.decode_mxfp4_blocks(blocks, scales).transpose(1, 2).to(torch.bfloat16)
    assert ours.shape == ref.shape == (E, G * 32, out_f)
    assert torch.equal(bits(ours), bits(ref))


def test_expert_tensors_bit_identical_to_transformers(tiny_mxfp4, tiny_bf16):
    ours = load_dir(tiny_bf16)
    n = 0
    for shard in sorted(tiny_mxfp4.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                if k.endswith("_blocks"):
                    base = k[: -len("_blocks")]
                    scales_shard = json.loads((tiny_mxfp4 / cg.INDEX_NAME).read_text())["weight_map"][base + "_scales"]
                    with safe_open(str(tiny_mxfp4 / scales_shard), "pt") as fs:
                        ref = convert_moe_packed_tensors(f.get_tensor(k), fs.get_tensor(base + "_scales"))
                    assert ours[base].dtype == torch.bfloat16
                    assert torch.equal(bits(ours[base]), bits(ref)), base
                    n += 1
    assert n == 4  # 2 layers x (gate_up, down)


# ---------------------------------------------------------------- the output folder

def test_output_loads_without_missing_keys_and_logits_equal_transformers(tiny_mxfp4, tiny_bf16):
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_mxfp4), dtype=torch.bfloat16,
                                               quantization_config=Mxfp4Config(dequantize=True))
    ours, info = AutoModelForCausalLM.from_pretrained(str(tiny_bf16), dtype=torch.bfloat16,
                                                      output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() or info["mismatched_keys"] == []
    assert type(ours.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_config_index_and_side_files(tiny_mxfp4, tiny_bf16):
    src_cfg = json.loads((tiny_mxfp4 / "config.json").read_text())
    out_cfg = json.loads((tiny_bf16 / "config.json").read_text())
    assert "quantization_config" not in out_cfg
    assert out_cfg["model_type"] == "gpt_oss" and out_cfg["dtype"] == "bfloat16"
    for k, v in src_cfg.items():
        if k not in ("quantization_config", "dtype", "torch_dtype"):
            assert out_cfg[k] == v, k
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        assert filecmp.cmp(tiny_mxfp4 / name, tiny_bf16 / name, shallow=False), name
    index = json.loads((tiny_bf16 / cg.INDEX_NAME).read_text())
    tensors = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(tiny_bf16 / shard), "pt") as f:
            tensors.update({k: shard for k in f.keys()})
    assert tensors == index["weight_map"]
    assert not any(k.endswith(("_blocks", "_scales")) for k in tensors)
    assert index["metadata"]["total_size"] == sum((tiny_bf16 / s).stat().st_size for s in set(tensors.values()))
    assert len(set(tensors.values())) >= 2
    assert not list(tiny_bf16.glob("*.partial")) and not (tiny_bf16 / cg.PROGRESS_NAME).exists()


def test_transformers_method_writes_the_same_tensors(tiny_mxfp4, tiny_bf16, tmp_path):
    dst = tmp_path / "ref"
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", dst, "--method", "transformers", "--device-map", "cpu-only")
    assert r.returncode == 0, r.stderr
    ref, ours = load_dir(dst), load_dir(tiny_bf16)
    assert ref.keys() == ours.keys()
    for k in ours:
        assert torch.equal(bits(ref[k]), bits(ours[k])), k
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())


# ---------------------------------------------------------------- crash safety

def test_interrupted_then_resumed_is_bit_identical(tiny_mxfp4, tiny_bf16, tmp_path):
    dst = tmp_path / "out"
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", dst, "--device", "cpu",
                env={"_GPTOSS_TEST_STOP_AFTER_SHARDS": "1"})
    assert r.returncode == 75, r.stderr   # died after the first shard, like a kill
    assert not (dst / "config.json").exists(), "an interrupted run must not look finished"
    assert len(list(dst.glob("*.safetensors"))) == 1
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", dst)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", dst, "--resume", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "already complete" in r.stderr
    for f in sorted(p.name for p in tiny_bf16.iterdir()):
        assert filecmp.cmp(tiny_bf16 / f, dst / f, shallow=False), f
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in tiny_bf16.iterdir())


def test_resume_redoes_a_damaged_shard(tiny_mxfp4, tiny_bf16, tmp_path):
    dst = tmp_path / "out"
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", dst, "--device", "cpu",
                env={"_GPTOSS_TEST_STOP_AFTER_SHARDS": "1"})
    assert r.returncode == 75
    shard = next(dst.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])  # the disk lost its tail
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", dst, "--resume", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "already complete" not in r.stderr
    assert filecmp.cmp(tiny_bf16 / shard.name, shard, shallow=False)


# ---------------------------------------------------------------- FP16 range

@pytest.fixture(scope="module")
def hot_mxfp4(tiny_mxfp4, tmp_path_factory) -> Path:
    """The tiny model with one expert block scaled by 2^20: values far beyond FP16's 65504."""
    d = tmp_path_factory.mktemp("hot") / "m"
    shutil.copytree(tiny_mxfp4, d)
    index = json.loads((d / cg.INDEX_NAME).read_text())
    name = "model.layers.0.mlp.experts.down_proj_scales"
    shard = d / index["weight_map"][name]
    tensors = load_file(str(shard))
    s = tensors[name].clone()
    s[0, 0, 0] = 127 + 20          # that block's max |value| becomes 6 * 2^20
    s[0, 1, 0] = 1                 # and this one's 0.5 * 2^-126: below FP16's smallest subnormal
    tensors[name] = s
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return d


def test_fp16_refuses_overflow_by_default(hot_mxfp4, tmp_path):
    dst = tmp_path / "fp16"
    r = run_cli("dequantize", "--src", hot_mxfp4, "--dst", dst, "--dtype", "fp16", "--device", "cpu")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "down_proj" in err and "--dtype bf16" in err and "Traceback" not in r.stderr
    assert not (dst / "config.json").exists() and not list(dst.glob("*.partial"))


@pytest.mark.parametrize("mode", ["clamp", "inf"])
def test_fp16_overflow_modes_count_and_apply(hot_mxfp4, tmp_path, mode):
    dst = tmp_path / mode
    r = run_cli("dequantize", "--src", hot_mxfp4, "--dst", dst, "--dtype", "fp16", "--device", "cpu",
                "--fp16-overflow", mode)
    assert r.returncode == 0, r.stderr
    w = load_dir(dst)["model.layers.0.mlp.experts.down_proj"]
    assert w.dtype == torch.float16
    # the log counts every tensor cast to FP16, BF16 ones included: a trained weight can be below
    # FP16's smallest subnormal too (one lm_head value in one training of the fixture)
    src = load_dir(hot_mxfp4)
    counts = {}
    for name, t in src.items():
        if name.endswith("_blocks"):
            name = name[:-len("_blocks")]
            t = convert_moe_packed_tensors(t, src[name + "_scales"], dtype=torch.float32)
        elif name.endswith("_scales") or not t.is_floating_point():
            continue
        counts[name] = (int((t.abs() >= 65520).sum()), int(((t != 0) & (t.to(torch.float16) == 0)).sum()))
        if name == "model.layers.0.mlp.experts.down_proj":
            hot = t
    assert min(counts["model.layers.0.mlp.experts.down_proj"]) > 0
    n_over, n_flush = (sum(c[i] for c in counts.values()) for i in (0, 1))
    assert f"{n_over} values overflowed" in r.stderr and f"{n_flush} non-zero values flushed" in r.stderr
    ref = hot
    if mode == "clamp":
        assert torch.isfinite(w).all() and w.abs().max() == 65504
    else:
        assert int(torch.isinf(w).sum()) == n_over


# ---------------------------------------------------------------- bad input: one line, exit 2

def one_line_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), r.stderr
    for frag in fragments:
        assert frag in last, (frag, last)


def test_bad_missing_source(tmp_path):
    one_line_error(run_cli("dequantize", "--src", tmp_path / "nope", "--dst", tmp_path / "o"), "does not exist")


def test_bad_hub_id_offline(tmp_path):
    r = run_cli("dequantize", "--src", "openai/gpt-oss-20b", "--dst", tmp_path / "o",
                env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    one_line_error(r, "cannot fetch openai/gpt-oss-20b", "--src")


def test_bad_not_gptoss(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_line_error(run_cli("dequantize", "--src", d, "--dst", tmp_path / "o"), "'llama'", "not 'gpt_oss'")


def test_bad_already_bf16(tiny_bf16, tmp_path):
    one_line_error(run_cli("dequantize", "--src", tiny_bf16, "--dst", tmp_path / "o"),
                   "already unquantized", "quantize --model-in")


def test_bad_truncated_shard(tiny_mxfp4, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_mxfp4, d)
    shard = sorted(d.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    dst = tmp_path / "o"
    one_line_error(run_cli("dequantize", "--src", d, "--dst", dst), shard.name, "re-download")
    assert not (dst / "config.json").exists()


def test_bad_index_names_missing_shard(tiny_mxfp4, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_mxfp4, d)
    sorted(d.glob("*.safetensors"))[0].unlink()
    one_line_error(run_cli("dequantize", "--src", d, "--dst", tmp_path / "o"), "missing", "re-download")


def test_bad_unwritable_destination(tiny_mxfp4, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run_cli("dequantize", "--src", tiny_mxfp4, "--dst", blocker / "sub"), "cannot write to --dst")


def test_bad_unknown_dtype(tiny_mxfp4, tmp_path):
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", tmp_path / "o", "--dtype", "fp8")
    one_line_error(r, "--dtype", "fp8")
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_is_instant_and_imports_no_torch():
    code = ("import sys, contextlib, io; sys.argv=['x']; import compress_gptoss as c\n"
            "for a in (['--help'], ['dequantize','--help'], ['quantize','--help'], ['install-kernel','--help'],"
            " ['verify-runtime','--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: c.main(a)\n"
            "        except SystemExit as e: assert e.code == 0, (a, e.code)\n"
            "assert 'torch' not in sys.modules, 'help imported torch'\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_matches_cpu():
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (4, 96, 9, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 255, (4, 96, 9), generator=g, dtype=torch.uint8)
    scales.view(-1)[:255] = torch.arange(255, dtype=torch.uint8)
    cpu = cg.decode_mxfp4_blocks(blocks, scales).transpose(1, 2).to(torch.bfloat16)
    gpu = cg.decode_mxfp4_to(blocks.cuda(), scales.cuda(), torch.bfloat16).cpu()
    assert torch.equal(bits(cpu), bits(gpu))


def test_triton_decode_kernel_bit_identical_under_interpreter(tmp_path):
    """The fused CUDA decode kernel, run by Triton's CPU interpreter, over every code and scale."""
    pytest.importorskip("triton")
    code = """
import torch, compress_gptoss as cg
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
g = torch.Generator().manual_seed(5)
E, O, G = 1, 70, 5                      # O = 70 and K = 160: not multiples of the 32 x 256 tile
blocks = torch.randint(0, 256, (E, O, G, 16), generator=g, dtype=torch.uint8)
blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
scales = torch.randint(0, 255, (E, O, G), generator=g, dtype=torch.uint8)
scales.view(-1)[:255] = torch.arange(255, dtype=torch.uint8)
out = torch.full((E, G * 32, O), float("nan"), dtype=torch.bfloat16)
cg.mxfp4_triton_kernel()[(3, 1, E)](blocks, scales, out, O, G * 32, BLOCK_O=32, BLOCK_K=256)
ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
print(int((out.view(torch.int16) != ref.view(torch.int16)).sum()))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**__import__("os").environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "0"


def test_cpu_bf16_fast_path_bit_identical_to_transformers():
    g = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, (2, 48, 9, 16), generator=g, dtype=torch.uint8)
    blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales = torch.randint(0, 255, (2, 48, 9), generator=g, dtype=torch.uint8)
    scales.view(-1)[:255] = torch.arange(255, dtype=torch.uint8)
    ours = cg.decode_mxfp4_to(blocks, scales, torch.bfloat16)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert torch.equal(bits(ours), bits(ref))


def test_workers_give_the_same_bytes(tiny_mxfp4, tiny_bf16, tmp_path):
    dst = tmp_path / "w2"
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", dst, "--device", "cpu", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "2 worker processes" in r.stderr
    for f in sorted(p.name for p in tiny_bf16.iterdir()):
        assert filecmp.cmp(tiny_bf16 / f, dst / f, shallow=False), f
