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
