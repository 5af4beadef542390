"""README.md is a manual that cannot rot: its CPU-runnable commands run here, on the tiny model.

The marker: a fenced block whose info string is the language followed by `cpu-tested`, i.e.
```bash cpu-tested  or  ```python cpu-tested. GitHub shows it as a plain bash / python block.
Such a block must run on a CPU in well under a minute with nothing but this repository.

How they run: in README order, as one user session, in a fresh folder that holds links to
compress_gptoss.py and tests/ (so `python compress_gptoss.py ...` and `python tests/tiny_gptoss.py
...` mean what they mean in a checkout), with `python` on PATH being this test's interpreter.
bash blocks run under `bash -euo pipefail`; python blocks as a script in that folder. Nothing is
substituted: the text a user reads is the text that runs.

Also checked: the README stays a manual (at most 300 lines, no "run 12"-style citations of the lab
notebook), every `make X` it names is a Makefile target, every `--flag` of its
`compress_gptoss.py SUBCOMMAND` lines is in that subcommand's --help, and every link into another
file of the repo (README.md, docs/, bench/RESULTS.md) names a file and heading that exist.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 300
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.M | re.S)
CLI_LINE = re.compile(r"compress_gptoss\.py (dequantize|quantize|install-kernel|verify-runtime)\b(.*)")


def fenced_blocks(text: str) -> list[tuple[str, list[str], str]]:
    """(language, the info string's other words, body) of every fenced block, in order."""
    return [(lang, info.split(), body) for lang, info, body in FENCE.findall(text)]


def cpu_tested_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, words, body in fenced_blocks(README.read_text()) if "cpu-tested" in words]


def logical_lines(body: str) -> list[str]:
    """Shell lines with their backslash continuations joined and comments dropped."""
    return [line.split(" #")[0] for line in body.replace("\\\n", " ").splitlines()]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


##### a manual, not a lab notebook #####

def test_readme_is_short_and_cites_no_runs():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert re.findall(r"\bruns? \d+", text, re.I) == []


def test_readme_marks_runnable_blocks():
    langs = [lang for lang, _ in cpu_tested_blocks()]
    assert len(langs) >= 4 and set(langs) <= {"bash", "python"}, langs


def test_readme_names_only_real_make_targets():
    targets = set(re.findall(r"^([A-Za-z0-9_-]+):(?!=)", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ([a-z][a-z0-9_-]+)", README.read_text()))
    assert {"demo", "test"} <= named <= targets, named - targets


def test_readme_flags_exist_in_the_cli():
    used: dict[str, set[str]] = {}
    for lang, _, body in fenced_blocks(README.read_text()):
        if lang == "bash":
            for line in logical_lines(body):
                if m := CLI_LINE.search(line):
                    used.setdefault(m[1], set()).update(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", m[2]))
    assert set(used) == {"dequantize", "quantize", "install-kernel", "verify-runtime"}
    for command, flags in used.items():
        r = subprocess.run([sys.executable, str(ROOT / "compress_gptoss.py"), command, "--help"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        known = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", r.stdout))
        assert flags <= known, (command, flags - known)


@pytest.mark.parametrize("doc", ["README.md", "docs/README-docker.md", "bench/RESULTS.md"])
def test_links_name_real_files_and_headings(doc):
    source = ROOT / doc
    if not source.exists():
        pytest.skip(f"{doc} is not in this checkout")
    links = re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", FENCE.sub("", source.read_text()))
    checked = 0
    for target, anchor in links:
        if re.match(r"[a-z]+:", target):
            continue   # http(s): not ours to check offline
        path = (source.parent / target).resolve() if target else source
        assert path.exists(), (doc, target)
        if anchor:
            assert anchor in headings(path), (doc, target, anchor)
        checked += 1
    assert checked or doc != "README.md"


##### the cpu-tested blocks run #####

def test_readme_cpu_tested_blocks_run(tiny_mxfp4, tmp_path):
    # tiny_mxfp4: the tiny model's cache is built before the README's `python tests/tiny_gptoss.py` copies it
    work = tmp_path / "user"
    work.mkdir()
    (work / "compress_gptoss.py").symlink_to(ROOT / "compress_gptoss.py")
    (work / "tests").symlink_to(ROOT / "tests")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for i, (lang, body) in enumerate(cpu_tested_blocks()):
        if lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", body]
        else:
            script = work / f"readme_block_{i}.py"
            script.write_text(body)
            cmd = ["python", script.name]
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README block {i} ({lang}) failed:\n{body}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    # what the blocks promise exists: the BF16 copy, the quantized folder and its quality report
    assert (work / "tiny-bf16" / "config.json").is_file()
    assert (work / "tiny-rtn" / "quality.json").is_file()
