"""Nothing lost: --overwrite replaces only an earlier output of this tool, every bad argument is refused
in one line before any work, a killed run leaves nothing behind that a rerun does not clear.

Every case checks the file system afterwards: the sha256 of every file that was there before (the
source model, sentinel files beside and inside the destination) is unchanged, and no empty or hidden
folder is left behind. The CLI runs for real (subprocess, or main() in this process where only the
argument handling is under test)."""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import compress_gptoss as cg
from conftest import CLI, run_cli

FAST_QUANT = ["--algo", "rtn", "--experts", "w4a16", "--mw", "w4a16",
              "--num-calibration-samples", "6", "--max-seq-length", "32"]


def snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file below root (links not followed)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            if not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_untouched(before: dict, root: Path, written: Path | None = None):
    """Every file of `before` is still there with the same bytes (except inside a folder the tool wrote)."""
    after = snapshot(root)
    for rel, digest in before.items():
        if written is not None and (root / rel).resolve().is_relative_to(written.resolve()):
            continue
        assert after.get(rel) == digest, f"{rel} was deleted or changed"


def one_error_line(r):
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    return errors[0]


def no_leftovers(folder: Path):
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".gptoss-compressor.json"]
    empty = [p.name for p in folder.iterdir() if p.is_dir() and not any(p.iterdir())]
    assert not hidden and not empty, (hidden, empty)


@pytest.fixture
def world(tiny_mxfp4, tmp_path):
    """parent/{model (a copy of the MXFP4 source), sibling/keep.txt, notes.txt}: what a user's disk holds."""
    parent = tmp_path / "parent"
    src = parent / "model"
    shutil.copytree(tiny_mxfp4, src)
    (parent / "sibling").mkdir()
    (parent / "sibling" / "keep.txt").write_text("the user's file\n")
    (parent / "notes.txt").write_text("notes\n")
    return parent, src


# ---------------------------------------------------------------- --overwrite never deletes what is not ours

def test_dst_holding_the_source_is_refused(world, monkeypatch):
    parent, src = world
    before = snapshot(parent)
    r = run_cli("dequantize", "--src", src, "--dst", parent, "--overwrite")
    assert "a folder holding the source model" in one_error_line(r)
    assert_untouched(before, parent)


def test_dst_and_output_dir_dot_are_refused(world, tiny_bf16, tmp_path):
    parent, src = world
    before = snapshot(parent)
    for args in (["dequantize", "--src", src, "--dst", ".", "--overwrite"],
                 ["quantize", "--model-in", tiny_bf16, "--output-dir", ".", "--overwrite", "--calib-jsonl",
                  parent / "notes.txt"]):
        r = subprocess.run(CLI + [str(a) for a in args], cwd=parent / "sibling", capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "the current directory" in one_error_line(r)
    assert_untouched(before, parent)


def test_output_dir_file_is_refused_before_any_work(world, tiny_bf16):
    parent, _ = world
    before = snapshot(parent)
    r = run_cli("quantize", "--model-in", tiny_bf16, "--output-dir", parent / "notes.txt", "--overwrite",
                "--calib-jsonl", parent / "notes.txt")
    line = one_error_line(r)
    assert "is a file" in line and "calibration" not in r.stderr   # refused at plan time, nothing calibrated
    assert_untouched(before, parent)


def test_overwrite_refuses_a_folder_with_foreign_files_but_replaces_our_own(world, tmp_path):
    parent, src = world
    dst = tmp_path / "out"
    assert run_cli("dequantize", "--src", src, "--dst", dst, "--device", "cpu").returncode == 0
    first = snapshot(dst)
    (dst / "my-notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    line = one_error_line(run_cli("dequantize", "--src", src, "--dst", dst, "--overwrite", "--device", "cpu"))
    assert "my-notes.txt" in line and "--overwrite would delete" in line
    assert_untouched(before, tmp_path)
    (dst / "my-notes.txt").unlink()
    r = run_cli("dequantize", "--src", src, "--dst", dst, "--overwrite", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert snapshot(dst) == first                   # replaced by the same output, nothing else there


def test_overwrite_refuses_a_folder_without_marker(world, tmp_path):
    parent, src = world
    before = snapshot(parent)
    line = one_error_line(run_cli("dequantize", "--src", src, "--dst", parent / "sibling", "--overwrite"))
    assert "not written by this tool" in line and "keep.txt" in line
    assert_untouched(before, parent)


def test_a_refused_run_leaves_no_empty_folder(tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    one_error_line(run_cli("dequantize", "--src", llama, "--dst", tmp_path / "new" / "dst"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_property_no_foreign_file_is_ever_deleted_or_changed(world, tiny_bf16, tmp_path, monkeypatch, capsys, seed):
    """Random --src/--dst (dequantize) and --output-dir (quantize) among a fresh path, the source, its
    parent, its child, '.', a sibling holding other files and a file, with and without --overwrite."""
    parent, src = world
    (src / "child").mkdir()
    (src / "child" / "x.txt").write_text("x\n")
    monkeypatch.chdir(parent / "sibling")
    places = {"fresh": tmp_path / "fresh", "source": src, "parent": parent, "child": src / "child", "dot": Path("."),
              "sibling": parent / "sibling", "file": parent / "notes.txt"}
    rng = random.Random(seed)
    cases = [(cmd, where, ow) for cmd in ("dequantize", "quantize") for where in places for ow in (False, True)
             if not (cmd == "quantize" and where == "fresh")]       # a fresh quantize is a whole run: tested elsewhere
    for cmd, where, overwrite in rng.sample(cases, 10):
        before = snapshot(tmp_path)
        dst = places[where]
        args = (["dequantize", "--src", str(src), "--dst", str(dst), "--device", "cpu"] if cmd == "dequantize" else
                ["quantize", "--model-in", str(tiny_bf16), "--output-dir", str(dst), "--calib-jsonl",
                 str(parent / "notes.txt"), *FAST_QUANT])
        rc = cg.main(args + (["--overwrite"] if overwrite else []))
        err = capsys.readouterr().err
        written = dst if (rc == 0 and where == "fresh") else None
        assert rc == 0 if where == "fresh" else rc != 0, (cmd, where, overwrite, err)
        assert_untouched(before, tmp_path, written)
        if written:
            shutil.rmtree(written)


# ---------------------------------------------------------------- every argument checked first

@pytest.mark.parametrize("flags, fragment", [
    (["--num-calibration-samples", "0"], "give 1 or more samples"),
    (["--num-calibration-samples", "-3"], "give 1 or more samples"),
    (["--max-seq-length", "1"], "give 2 or more tokens"),
    (["--max-seq-length", "-1"], "give 2 or more tokens"),
    (["--with-sparse", "--mask", "3:2"], "0 < N < M"),
    (["--extra-ignore", "re:["], "not a valid regex"),
    (["--experts-regex", "(("], "not a valid regex"),
    (["--group-size", "48"], "power of two"),
    (["--sparsity", "1.5"], "below 1"),
    (["--dampening-frac", "-0.1"], "from 0"),
    (["--max-cpu-memory", "lots"], "not a size"),
    (["--calib-batch-size", "0"], "give 1 or more"),
])
def test_bad_quantize_argument_is_one_line_and_writes_nothing(flags, fragment, tiny_bf16, tmp_path):
    out = tmp_path / "out"
    r = run_cli("quantize", "--model-in", tiny_bf16, "--calib-jsonl", tmp_path / "none.jsonl",
                "--output-dir", out, *flags)
    assert fragment in one_error_line(r) and r.returncode == 2
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, fragment", [
    (["--device", "tpu"], "give auto, cpu, cuda or cuda:N"),
    (["--workers", "0"], "give 1 or more"),
    (["--max-gpu-memory", "5 potatoes"], "not a size"),
])
def test_bad_dequantize_argument_is_one_line_and_writes_nothing(flags, fragment, tiny_mxfp4, tmp_path):
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", tmp_path / "dst", *flags)
    assert fragment in one_error_line(r) and r.returncode == 2
    assert sorted(tmp_path.iterdir()) == []


def test_resume_on_a_finished_output_says_complete(tiny_mxfp4, tiny_bf16):
    r = run_cli("dequantize", "--src", tiny_mxfp4, "--dst", tiny_bf16, "--resume", "--device", "cpu")
    assert r.returncode == 0 and "already complete" in r.stderr, r.stderr


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: writes past it fail with the errors the libraries really raise (needs root, as CI is)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)   # lazy: a library may still hold a handle


def test_disk_full_is_recognised_as_the_libraries_raise_it(full_disk):
    import torch
    from safetensors.torch import save_file
    errors = []
    for write in (lambda: (full_disk / "a").write_bytes(b"x" * (1 << 20)),
                  lambda: save_file({"w": torch.ones(1 << 18)}, str(full_disk / "b.safetensors")),
                  lambda: torch.save(torch.ones(1 << 18), full_disk / "c.pt")):
        try:
            write()
        except Exception as e:  # noqa: BLE001 - whatever each library raises
            errors.append(e)
        for f in full_disk.iterdir():
            f.unlink()
    assert len(errors) == 3 and all(cg.disk_full(e) for e in errors), [repr(e) for e in errors]
    assert not cg.disk_full(RuntimeError("shape mismatch"))


def test_output_on_a_full_disk_is_refused_before_any_work(full_disk, tiny_bf16, calib_jsonl):
    r = run_cli("quantize", "--model-in", tiny_bf16, "--calib-jsonl", calib_jsonl, "--output-dir", full_disk / "out",
                *FAST_QUANT)
    line = one_error_line(r)
    assert "not enough disk space" in line and "source logits" in line
    assert not re.search(r"\] calibration: \d+ samples", r.stderr)      # refused before calibrating
    assert list(full_disk.iterdir()) == []


# ---------------------------------------------------------------- late failures keep finished work

def test_failed_evaluation_keeps_the_saved_model_and_eval_only_redoes_it(tiny_bf16, calib_jsonl, heldout_jsonl,
                                                                          tmp_path):
    out = tmp_path / "out"
    flags = ["--model-in", tiny_bf16, "--calib-jsonl", calib_jsonl, "--eval-jsonl", heldout_jsonl,
             "--output-dir", out, *FAST_QUANT]
    r = run_cli("quantize", *flags, env={"_GPTOSS_TEST_FAIL_EVAL": "1"})
    line = one_error_line(r)
    assert r.returncode == 1 and "saved in" in line and "--eval-only" in line
    assert (out / "config.json").exists() and not (out / "quality.json").exists()
    no_leftovers(tmp_path)
    r = run_cli("quantize", *flags, "--eval-only")
    assert r.returncode == 0, r.stderr[-2000:]
    q = json.loads((out / "quality.json").read_text())
    assert q["heldout_tokens"] > 0 and q["kl_mean"] is not None
    no_leftovers(tmp_path)


# ---------------------------------------------------------------- killed runs

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_removes_what_a_killed_run_left(tiny_bf16, calib_jsonl, tmp_path):
    out = tmp_path / "out"
    pid = dead_pid()
    ours = tmp_path / f".out.partial-{pid}"
    ours.mkdir()
    (ours / "model.safetensors").write_bytes(b"\0" * 100_000)
    cg.write_marker(ours, "quantize", scratch=True)
    spill = tmp_path / f".eval-logits-{pid}-abc"
    spill.mkdir()
    (spill / "0.pt").write_bytes(b"\0" * 1000)
    cg.write_marker(spill, "quantize", scratch=True)
    not_ours = tmp_path / f".out.partial-{pid + 1}"        # same pattern, no marker: the user's
    not_ours.mkdir()
    (not_ours / "keep.txt").write_text("x")
    r = run_cli("quantize", "--model-in", tiny_bf16, "--calib-jsonl", calib_jsonl, "--output-dir", out,
                "--no-eval", *FAST_QUANT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"removed what a killed run left beside .*: 10\d\.\d KB freed", r.stderr), r.stderr
    assert not ours.exists() and not spill.exists() and (not_ours / "keep.txt").read_text() == "x"


def test_sigkill_at_random_points_then_rerun_equals_an_uninterrupted_run(tiny_bf16, calib_jsonl, heldout_jsonl,
                                                                         tmp_path):
    from test_quantize import tensors
    ref, out = tmp_path / "ref" / "out", tmp_path / "killed" / "out"
    flags = ["--model-in", tiny_bf16, "--calib-jsonl", calib_jsonl, "--eval-jsonl", heldout_jsonl, *FAST_QUANT]
    t0 = time.time()
    assert run_cli("quantize", *flags, "--output-dir", ref).returncode == 0
    whole = time.time() - t0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rng = random.Random(os.environ.get("PYTEST_SEED", "25"))
    for frac in (rng.uniform(0.3, 0.6), rng.uniform(0.6, 0.95)):      # calibrating, then saving / evaluating
        p = subprocess.Popen(CLI + ["quantize", *map(str, flags), "--output-dir", str(out), "--overwrite"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=frac * whole)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
    r = run_cli("quantize", *flags, "--output-dir", out, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = tensors(ref), tensors(out)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    no_leftovers(out.parent)
