"""Shared fixtures: the tiny GPT-OSS checkpoints (built once per machine, see tiny_gptoss.py) and a
CLI runner. Tests run the real command line in a subprocess, like a user."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tiny_gptoss  # noqa: E402

CLI = [sys.executable, str(ROOT / "compress_gptoss.py")]


def run_cli(*args, env=None, timeout=900):
    """Run compress_gptoss.py; returns CompletedProcess with .returncode, .stdout, .stderr."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_mxfp4() -> Path:
    """The trained tiny GPT-OSS in OpenAI's MXFP4 layout (shared cache: read it, never write it)."""
    return tiny_gptoss.cached()


@pytest.fixture(scope="session")
def tiny_bf16(tiny_mxfp4, tmp_path_factory) -> Path:
    """tiny_mxfp4 dequantized to BF16 by our CLI, once per session."""
    dst = tmp_path_factory.mktemp("bf16") / "tiny-gptoss-bf16"
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", dst, "--dtype", "bf16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return dst


# ---------------------------------------------------------------- quantize (tests/test_quantize.py)

@pytest.fixture(scope="session")
def calib_jsonl(tmp_path_factory) -> Path:
    """One small calibration set for every quantize test (the training split of the tiny corpus)."""
    return tiny_gptoss.corpus_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", "train", 16)


@pytest.fixture(scope="session")
def heldout_jsonl(tmp_path_factory) -> Path:
    """Held-out texts for quality.json, never used for calibration."""
    return tiny_gptoss.corpus_jsonl(tmp_path_factory.mktemp("heldout") / "heldout.jsonl", "heldout", 16)


@pytest.fixture(scope="session")
def tiny_llama(tiny_bf16, tmp_path_factory) -> Path:
    """A random LlamaForCausalLM (hidden 96, not a multiple of 64) with the tiny GPT-OSS tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    dst = tmp_path_factory.mktemp("llama") / "tiny-llama-bf16"
    tok = AutoTokenizer.from_pretrained(tiny_bf16)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


QUANT_CALIB = ["--num-calibration-samples", "16", "--max-seq-length", "64"]


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, calib_jsonl, heldout_jsonl):
    """quantized(name, model_dir, *flags) -> (CompletedProcess, output dir); each recipe runs once
    per session, with the shared calibration and held-out sets."""
    runs = {}
    root = tmp_path_factory.mktemp("quantized")

    def run(name, model_dir, *flags):
        if name not in runs:
            out = root / name
            r = run_cli("quantize", "--model-in", model_dir, "--calib-jsonl", calib_jsonl,
                        "--eval-jsonl", heldout_jsonl, *QUANT_CALIB, "--output-dir", out, *flags)
            runs[name] = (r, out)
        return runs[name]
    return run
