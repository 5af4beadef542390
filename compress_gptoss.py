#!/usr/bin/env python3
"""gptoss-compressor: upcast OpenAI's GPT-OSS (MXFP4 experts) to BF16/FP16, re-quantize it with
GPTQ / AWQ (W4A16, W8A8, W4A8, optional 2:4 sparsity) through LLM Compressor, and install and
check a W4A8 GEMM runtime.

Map of this file (sections in the order data flows):
  1. Common helpers ........ errors, logging, model-folder files, a streaming safetensors writer
  2. MXFP4 codec ........... decode_mxfp4_blocks (CPU / CUDA), FP16 range accounting
  3. dequantize ............ source resolution + checks, shard plan, streaming conversion, resume
  4. quantize .............. recipes per scheme, calibration data, the llmcompressor run
  5. Loader + quality ...... load a quantized GPT-OSS folder, quality.json
  6. Kernels + runtime ..... install-kernel, verify-runtime, built-in int4 GEMM
  7. CLI .................. argparse, one subparser per subcommand

Heavy imports (torch, transformers, llmcompressor) live inside the functions that need them so
that `--help` answers instantly.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__version__ = "0.1.0"

##### 1. Common helpers #####


class UserError(Exception):
    """Bad input or environment: main() prints the message as one line and exits non-zero."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def log(msg: str) -> None:
    print(f"[gptoss {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


INDEX_NAME = "model.safetensors.index.json"
SINGLE_SHARD_NAME = "model.safetensors"
# Files of a model folder that are neither weights nor config: copied as they are.
COPY_SKIP = {INDEX_NAME, "config.json"}


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {what}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-download or fix it")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template, generation config, license, ...: every top-level file but weights."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in COPY_SKIP \
                and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64",
                      "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64",
                      "bool": "BOOL"}


@dataclass
class TensorSpec:
    name: str
    dtype: object          # torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


class SafetensorsStreamWriter:
    """Writes one .safetensors file tensor by tensor, chunk by chunk.

    Written by hand because safetensors.torch.save_file needs every tensor in RAM at once; the
    format is a little-endian u64 header length, a JSON header, then the raw bytes in order.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict | None = None):
        self.path, self.specs = path, specs
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = metadata
        for s in specs:
            header[s.name] = {"dtype": SAFETENSORS_DTYPES[str(s.dtype).replace("torch.", "")],
                              "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
        self.data_bytes = offset
        self.f = open(path, "wb")
        self.f.write(len(blob).to_bytes(8, "little"))
        self.f.write(blob)
        self.expected = iter(specs)
        self.current: TensorSpec | None = None
        self.left = 0

    def begin(self, name: str) -> None:
        assert self.left == 0, f"{self.current.name} is short of {self.left} bytes"
        self.current = next(self.expected)
        assert self.current.name == name, f"writer expected {self.current.name}, got {name}"
        self.left = self.current.nbytes

    def write(self, chunk) -> None:
        """chunk: a CPU tensor of the current tensor's dtype, the next rows in C order."""
        assert chunk.dtype == self.current.dtype, (chunk.dtype, self.current)
        raw = chunk.contiguous().view(-1).view(__import__("torch").uint8).numpy()
        self.left -= raw.nbytes
        assert self.left >= 0, f"{self.current.name}: more bytes than its shape"
        self.f.write(memoryview(raw))

    def close(self) -> None:
        assert self.left == 0 and next(self.expected, None) is None, f"{self.path}: incomplete"
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


##### 2. MXFP4 codec #####
# OpenAI stores each expert matrix W [out, in] as blocks of 32 inputs: 16 bytes of FP4 (E2M1)
# codes, low nibble first, and one E8M0 scale byte (2^(s-127)) per block.

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP16_MAX = 65504.0


def _byte_lut(device):
    """[256, 2] float32: the two FP4 values packed in each byte (low nibble first)."""
    import torch
    fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([fp4[b & 0xF], fp4[b >> 4]], dim=1).to(device)


_LUT_CACHE: dict = {}


def decode_mxfp4_blocks(blocks, scales, dtype):
    """blocks [..., G, 16] uint8 + scales [..., G] uint8 -> float32 values [..., G*32].

    Same arithmetic as transformers' convert_moe_packed_tensors (an exact FP4 value times
    2^(s-127) in float32, one rounding at the cast), so the result cast to bf16 is bit-identical.
    `dtype` only picks the device table; the cast is the caller's, who counts FP16 overflow.
    """
    import torch
    assert blocks.shape[:-1] == scales.shape and blocks.shape[-1] == 16, (blocks.shape, scales.shape)
    key = str(blocks.device)
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = _byte_lut(blocks.device)
    vals = _LUT_CACHE[key][blocks.long()]                         # [..., G, 16, 2]
    vals = vals.view(*blocks.shape[:-1], 32)
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return vals.view(*blocks.shape[:-2], blocks.shape[-2] * 32)


@dataclass
class RangeReport:
    """Values that do not survive the cast to FP16 (none can for BF16, which has FP32's range)."""
    overflow: int = 0            # finite source value -> +-inf (|x| >= 65520)
    flushed: int = 0             # non-zero source value -> 0
    first_overflow: str = ""

    def add(self, other: "RangeReport") -> None:
        self.overflow += other.overflow
        self.flushed += other.flushed
        self.first_overflow = self.first_overflow or other.first_overflow


def cast_checked(x, dtype, name: str, overflow_mode: str):
    """Cast float values to dtype; for fp16 count overflow / flush-to-zero and apply overflow_mode."""
    import torch
    y = x.to(dtype)
    rep = RangeReport()
    if dtype == torch.float16:
        over = torch.isinf(y) & torch.isfinite(x)
        rep.overflow = int(over.sum())
        rep.flushed = int(((y == 0) & (x != 0)).sum())
        if rep.overflow:
            rep.first_overflow = name
            if overflow_mode == "clamp":
                y = torch.where(over, torch.sign(x).to(dtype) * FP16_MAX, y)
    return y, rep


##### 3. dequantize #####

HUB_ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "LICENSE*", "USAGE_POLICY*", "README*"]
HUB_IGNORE = ["original/*", "metal/*"]  # OpenAI's repos also hold the weights in two other formats


def looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not s.startswith((".", "/", "~"))


def resolve_model_dir(src: str, flag: str) -> Path:
    """A local folder as it is; a Hub id through huggingface_hub (weights + tokenizer files only)."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{flag} {src} is a file: pass the model's folder")
        return p
    if not looks_like_hub_id(src):
        raise UserError(f"{flag} {src} does not exist: pass a model folder or a Hub id like openai/gpt-oss-20b")
    from huggingface_hub import snapshot_download
    log(f"{flag} {src}: not a local folder, fetching from the Hugging Face Hub (weights + tokenizer only)")
    try:
        return Path(snapshot_download(src, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE))
    except Exception as e:  # offline, 404, gated, auth: all end the same way for the user
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot fetch {src} from the Hugging Face Hub ({type(e).__name__}: {reason}): "
                        f"download it where the Hub is reachable and pass the local folder to {flag}")


@dataclass
class SourceModel:
    """A GPT-OSS MXFP4 folder: config + which shard holds each tensor."""
    path: Path
    config: dict
    weight_map: dict              # tensor name -> shard file name
    shards: list                  # shard file names in order

    @property
    def expert_names(self) -> list[str]:
        return sorted(n[: -len("_blocks")] for n in self.weight_map if n.endswith("_blocks"))


def open_safetensors(path: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing: re-download the model")
    except Exception as e:
        raise UserError(f"shard {path} is truncated or corrupt ({str(e).splitlines()[0][:120]}): re-download it")


def inspect_source(path: Path) -> SourceModel:
    """Check that `path` is an MXFP4 GPT-OSS checkpoint we can convert, and list its tensors."""
    config = read_json(path / "config.json", "not a Hugging Face model folder (no config.json)")
    if config.get("model_type") != "gpt_oss":
        raise UserError(f"{path} is model_type {config.get('model_type')!r}, not 'gpt_oss': "
                        f"dequantize converts GPT-OSS MXFP4 checkpoints only")
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "mxfp4":
        what = f"quantized with {qcfg.get('quant_method')!r}" if qcfg else "already unquantized (BF16/FP16)"
        raise UserError(f"{path} is {what}, not MXFP4: nothing to dequantize"
                        + ("; pass it to `quantize --model-in` directly" if not qcfg else ""))
    if (path / INDEX_NAME).exists():
        index = read_json(path / INDEX_NAME, "")
        weight_map = index.get("weight_map") or {}
        if not weight_map:
            raise UserError(f"{path / INDEX_NAME} has no weight_map: re-download the model")
    elif (path / SINGLE_SHARD_NAME).exists():
        with open_safetensors(path / SINGLE_SHARD_NAME) as f:
            weight_map = {k: SINGLE_SHARD_NAME for k in f.keys()}
    else:
        raise UserError(f"{path} has neither {INDEX_NAME} nor {SINGLE_SHARD_NAME}: not a safetensors checkpoint")
    shards = sorted(set(weight_map.values()))
    for s in shards:
        if not (path / s).exists():
            raise UserError(f"{INDEX_NAME} names shard {s}, which is missing from {path}: re-download it")
    src = SourceModel(path, config, weight_map, shards)
    for name in src.expert_names:
        if name + "_scales" not in weight_map:
            raise UserError(f"{name}_blocks has no {name}_scales in {path}: the checkpoint is incomplete")
    if not src.expert_names:
        raise UserError(f"{path} says mxfp4 but holds no *_blocks tensors: not an OpenAI MXFP4 checkpoint")
    return src


@dataclass
class ShardPlan:
    """One output shard: the tensors it holds (in file order) and where each comes from."""
    name: str
    specs: list                   # [TensorSpec]
    sources: dict                 # output name -> ("mxfp4", blocks_shard, scales_shard) | ("plain", shard)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def plan_output(src: SourceModel, dtype) -> list[ShardPlan]:
    """One output shard per source shard (same name), so --resume works shard by shard.

    An expert tensor goes where its _blocks live. Its shape turns from OpenAI's [E, out, in/32, 16]
    into transformers' [E, in, out]: gate_up_proj [E, H, 2I] (gate/up interleaved in even/odd
    columns, as stored), down_proj [E, I, H].
    """
    import torch
    headers = {}
    for shard in src.shards:
        with open_safetensors(src.path / shard) as f:
            headers[shard] = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    plans = {s: ShardPlan(s, [], {}) for s in src.shards}
    st_to_torch = {v: getattr(torch, k) for k, v in SAFETENSORS_DTYPES.items()}
    for name in sorted(src.weight_map):
        shard = src.weight_map[name]
        if name not in headers[shard]:
            raise UserError(f"{INDEX_NAME} puts {name} in {shard}, but that shard does not hold it: re-download")
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in src.weight_map:
            continue
        st_dtype, shape = headers[shard][name]
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            E, out_f, G, B = shape
            sshape = headers[src.weight_map[base + "_scales"]][base + "_scales"][1]
            if B != 16 or list(sshape) != [E, out_f, G]:
                raise UserError(f"{name} {shape} / scales {sshape}: not OpenAI's MXFP4 layout [E, out, in/32, 16]")
            plans[shard].specs.append(TensorSpec(base, dtype, (E, G * 32, out_f)))
            plans[shard].sources[base] = ("mxfp4", shard, src.weight_map[base + "_scales"])
        else:
            t_dtype = st_to_torch[st_dtype]
            out_dtype = dtype if t_dtype.is_floating_point else t_dtype
            plans[shard].specs.append(TensorSpec(name, out_dtype, tuple(shape)))
            plans[shard].sources[name] = ("plain", shard)
    return [plans[s] for s in src.shards]


def output_config(config: dict, dtype_name: str) -> dict:
    """Source config minus quantization_config; every other field kept, dtype set to the output's."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["dtype"] = dtype_name
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    return out


PROGRESS_NAME = ".dequantize-progress.json"


def source_fingerprint(src: SourceModel) -> dict:
    return {s: (src.path / s).stat().st_size for s in src.shards}


def shard_is_complete(path: Path, plan: ShardPlan) -> bool:
    """A finished shard: right size, and its header lists exactly the planned tensors and shapes."""
    if not path.exists() or path.stat().st_size < plan.nbytes:
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        return False
    return got == {s.name: s.shape for s in plan.specs}


def pick_device(requested: str) -> str:
    import torch
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is visible to torch; use --device cpu")
    return requested


# Rows of 16-byte blocks decoded per step: bounds the float32 temporaries (~ 256 MB on CPU).
DECODE_CHUNK_BLOCKS = 1 << 21


def convert_shard(src: SourceModel, plan: ShardPlan, out_path: Path, dtype, device: str,
                  overflow_mode: str, progress) -> RangeReport:
    """Decode / cast every tensor of one output shard and stream it to out_path."""
    import torch
    report = RangeReport()
    handles = {}

    def handle(shard):
        if shard not in handles:
            handles[shard] = open_safetensors(src.path / shard).__enter__()
        return handles[shard]

    writer = SafetensorsStreamWriter(out_path, plan.specs, metadata={"format": "pt"})
    try:
        for spec in plan.specs:
            writer.begin(spec.name)
            kind, *shards = plan.sources[spec.name]
            if kind == "plain":
                t = handle(shards[0]).get_tensor(spec.name)
                if t.is_floating_point():
                    t, rep = cast_checked(t, dtype, spec.name, overflow_mode)
                    report.add(rep)
                writer.write(t)
                progress.update(t.numel() * t.element_size())
                continue
            blocks_s = handle(shards[0]).get_slice(spec.name + "_blocks")
            scales_s = handle(shards[1]).get_slice(spec.name + "_scales")
            E, out_f, G, _ = blocks_s.get_shape()
            per_expert = out_f * G
            step = max(1, DECODE_CHUNK_BLOCKS // per_expert)
            for e0 in range(0, E, step):
                e1 = min(E, e0 + step)
                blocks = blocks_s[e0:e1].to(device, non_blocking=True)
                scales = scales_s[e0:e1].to(device, non_blocking=True)
                vals = decode_mxfp4_blocks(blocks, scales, dtype)          # [e, out, in] float32
                vals, rep = cast_checked(vals.transpose(1, 2), dtype, spec.name, overflow_mode)
                report.add(rep)
                if rep.overflow and overflow_mode == "error":
                    return report
                writer.write(vals.contiguous().cpu())
                progress.update(blocks.numel() + scales.numel())
        writer.close()
    finally:
        if not writer.f.closed:
            writer.f.close()
        for h in handles.values():
            h.__exit__(None, None, None)
    return report


def prepare_destination(dst: Path, src: Path, overwrite: bool, resume: bool) -> None:
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"--dst {dst} is the source folder or inside it: pick another folder")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"--dst {dst} is a file: pick a folder")
    if dst.exists() and any(dst.iterdir()):
        if resume:
            return
        if not overwrite:
            raise UserError(f"--dst {dst} is not empty: pass --overwrite to replace it or --resume to finish it")
        shutil.rmtree(dst)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe = dst / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --dst {dst} ({e.strerror}): pick a writable folder")


def dequantize_stream(src: SourceModel, dst: Path, dtype_name: str, device: str,
                      overflow_mode: str, resume: bool) -> RangeReport:
    import torch
    from tqdm import tqdm
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    plans = plan_output(src, dtype)
    fingerprint = {"source": str(src.path.resolve()), "shards": source_fingerprint(src), "dtype": dtype_name}
    progress_path = dst / PROGRESS_NAME
    done = {}
    if resume and progress_path.exists():
        state = read_json(progress_path, "")
        if state.get("fingerprint") != fingerprint:
            raise UserError(f"--resume: {dst} was started from another source or --dtype "
                            f"({state.get('fingerprint', {}).get('dtype')}): use --overwrite to start again")
        done = state.get("done", {})
    elif resume and any(p.suffix == ".safetensors" for p in dst.iterdir()):
        raise UserError(f"--resume: {dst} holds shards but no {PROGRESS_NAME}: use --overwrite to start again")
    todo = []
    for plan in plans:
        if plan.name in done and shard_is_complete(dst / plan.name, plan):
            log(f"resume: {plan.name} already complete ({human_bytes(plan.nbytes)}), skipped")
        else:
            todo.append(plan)
            done.pop(plan.name, None)
    in_bytes = sum((src.path / p.name).stat().st_size for p in todo)
    log(f"dequantize: {len(plans)} shards ({len(todo)} to write), {len(src.expert_names)} MXFP4 expert tensors "
        f"-> {dtype_name} on {device}; output {human_bytes(sum(p.nbytes for p in plans))}")
    report = RangeReport()
    stop_after = int(os.environ.get("_GPTOSS_TEST_STOP_AFTER_SHARDS", "0"))  # crash-safety tests only
    with tqdm(total=in_bytes, unit="B", unit_scale=True, desc="dequantize", file=sys.stderr,
              disable=None) as bar:
        for i, plan in enumerate(todo):
            final = dst / plan.name
            tmp = dst / (plan.name + ".partial")
            rep = convert_shard(src, plan, tmp, dtype, device, overflow_mode, bar)
            report.add(rep)
            if rep.overflow and overflow_mode == "error":
                tmp.unlink(missing_ok=True)
                raise UserError(
                    f"--dtype fp16: {rep.overflow} values of {rep.first_overflow} exceed FP16's +-65504 and "
                    f"would become inf; use --dtype bf16 (exact) or --fp16-overflow clamp (saturate) / inf (keep)")
            os.replace(tmp, final)
            done[plan.name] = {"bytes": final.stat().st_size}
            write_json_atomic(progress_path, {"fingerprint": fingerprint, "done": done})
            if stop_after and i + 1 >= stop_after:
                os._exit(75)
    return report


def finish_output(src_dir: Path, dst: Path, config: dict, dtype_name: str, weight_map: dict) -> None:
    """Index, side files, then config.json last: a folder without config.json is not a model yet."""
    total = sum((dst / s).stat().st_size for s in set(weight_map.values()))
    write_json_atomic(dst / INDEX_NAME, {"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))})
    copied = copy_side_files(src_dir, dst)
    log(f"copied {len(copied)} side files: {', '.join(copied)}")
    write_json_atomic(dst / "config.json", output_config(config, {"bf16": "bfloat16", "fp16": "float16"}[dtype_name]))
    (dst / PROGRESS_NAME).unlink(missing_ok=True)


def dequantize_with_transformers(src: SourceModel, dst: Path, dtype_name: str, device_map: str,
                                 offload_folder: str | None, max_gpu_memory: str | None) -> dict:
    """Reference path: transformers dequantizes the whole model in memory, we write the tensors.

    save_pretrained is bypassed: on transformers 5.17 it drops the dequantized expert weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    kwargs = {}
    if device_map == "cpu-only" or not torch.cuda.is_available():
        kwargs["device_map"] = "cpu"
    else:
        kwargs["device_map"] = device_map
        if max_gpu_memory:
            kwargs["max_memory"] = {i: max_gpu_memory for i in range(torch.cuda.device_count())} | {"cpu": "1TB"}
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    model = AutoModelForCausalLM.from_pretrained(str(src.path), quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=dtype, **kwargs)
    try:
        from accelerate.utils import get_state_dict_offloaded_model
        state = get_state_dict_offloaded_model(model)
    except Exception:
        state = model.state_dict()
    name = SINGLE_SHARD_NAME
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sorted(state.items())]
    tmp = dst / (name + ".partial")
    writer = SafetensorsStreamWriter(tmp, specs, metadata={"format": "pt"})
    for s in specs:
        writer.begin(s.name)
        writer.write(state[s.name].detach().cpu())
    writer.close()
    os.replace(tmp, dst / name)
    return {s.name: name for s in specs}


def cmd_dequantize(args: argparse.Namespace) -> int:
    import torch
    t0 = time.time()
    src_dir = resolve_model_dir(args.src, "--src")
    src = inspect_source(src_dir)
    dst = Path(args.dst).expanduser()
    prepare_destination(dst, src_dir, args.overwrite, args.resume)
    if args.method == "transformers":
        log(f"dequantize --method transformers: whole model in memory (device_map={args.device_map})")
        weight_map = dequantize_with_transformers(src, dst, args.dtype, args.device_map,
                                                  args.offload_folder, args.max_gpu_memory)
        report = RangeReport()
    else:
        device = pick_device(args.device)
        report = dequantize_stream(src, dst, args.dtype, device, args.fp16_overflow, args.resume)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        weight_map = {s.name: p.name for p in plan_output(src, dtype) for s in p.specs}
    finish_output(src_dir, dst, src.config, args.dtype, weight_map)
    size = sum((dst / s).stat().st_size for s in set(weight_map.values()))
    if args.dtype == "fp16":
        log(f"fp16 range: {report.overflow} values overflowed "
            f"({'clamped to +-65504' if args.fp16_overflow == 'clamp' else 'written as inf'} )"
            if report.overflow else "fp16 range: no value overflowed")
        log(f"fp16 range: {report.flushed} non-zero values flushed to zero")
    dt = time.time() - t0
    log(f"wrote {dst}: {len(weight_map)} tensors, {human_bytes(size)} in {dt:.1f} s "
        f"({human_bytes(size / max(dt, 1e-9))}/s), peak RSS {human_bytes(peak_rss_bytes())}")
    print(dst)
    return 0


##### 4. quantize #####


def cmd_quantize(args: argparse.Namespace) -> int:
    raise UserError("quantize is not implemented yet", exit_code=2)


##### 6. Kernels + runtime #####
# Two W4A8 runtimes: QQQ (an external CUDA extension, Marlin-based, built by `install-kernel`) and a
# built-in int4 GEMM written in Triton that reads compressed-tensors' `pack-quantized` layout as it
# is on disk. QQQ needs K % 128 == 0 for groups (no GPT-OSS layer has it: K = 2880); the built-in
# one takes any K divisible by the group size.
#
# The layout (compressed_tensors.compressors.pack_quantized, symmetric int4):
#   weight_packed int32 [N, ceil(K/8)]: element k of row n is nibble k % 8 (lowest first) of word
#                 k // 8, stored with an offset of +8 (so q = nibble - 8, q in [-8, 7])
#   weight_scale  [N, K / group] (per group) or [N, 1] (per channel); W[n, k] = q[n, k] * scale
# W4A8 (compressed-tensors' `input_activations: int8, strategy token, dynamic, symmetric`):
#   s_x[m] = max_k |x[m, k]| / 127,  x_q = round_half_away(x / s_x) in [-127, 127]
#   y[m, n] = s_x[m] * sum_g scale[n, g] * sum_{k in g} x_q[m, k] * q[n, k]   (int32 inside a group)

QQQ_REPO = "https://github.com/HandH1998/QQQ"
QQQ_COMMIT = "54c5c99037200f3b42b94877dcc932989e458409"
# (name, K, N) of every Linear shape in GPT-OSS (20b and 120b share hidden 2880, 64 heads x 64).
GPT_OSS_SHAPES = [("q_proj", 2880, 4096), ("k_proj/v_proj", 2880, 512), ("o_proj", 4096, 2880),
                  ("experts.gate_up", 2880, 5760), ("experts.down", 2880, 2880)]
GPT_OSS_BENCH_M = (1, 16, 64, 256, 1024)
INT8_ABSMAX_FLOOR = 1e-8   # an all-zero token gets this amax (scale ~8e-11) instead of dividing by 0


def unpack_int4_packed(weight_packed, in_features: int):
    """compressed-tensors pack-quantized int32 [N, ceil(K/8)] -> int8 q in [-8, 7], [N, K]."""
    import torch
    n, words = weight_packed.shape
    assert words == -(-in_features // 8), f"packed width {words} does not fit K={in_features}"
    shifts = torch.arange(0, 32, 4, device=weight_packed.device, dtype=torch.int32)
    nib = (weight_packed.unsqueeze(-1) >> shifts) & 0xF
    return (nib.reshape(n, words * 8)[:, :in_features] - 8).to(torch.int8)


def pack_int4(q):
    """int8 q in [-8, 7], [N, K] -> int32 [N, ceil(K/8)] in the pack-quantized layout."""
    import torch
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    n, k = q.shape
    u = torch.nn.functional.pad(q.to(torch.int64) + 8, (0, -k % 8)).reshape(n, -1, 8)
    words = (u << torch.arange(0, 32, 4, device=q.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def scale_group_size(weight_scale, in_features: int) -> int:
    """The K span of one scale column: the group size, or K for per-channel ([N, 1])."""
    groups = weight_scale.shape[-1]
    assert in_features % groups == 0, f"K={in_features} is not divisible into {groups} scale groups"
    return in_features // groups


def quantize_activations_int8(x):
    """Per-token symmetric int8, the exact arithmetic of the Triton kernels: v = x * 127 / amax in
    fp32 with one correctly rounded division (fp16 inputs hit exact .5 ties often, so a reciprocal
    multiply would round differently), then half away from zero. Returns (x_q int8, s_x fp32)."""
    import torch
    xf = x.float()
    amax = xf.abs().amax(dim=-1).clamp_min(INT8_ABSMAX_FLOOR)
    v = (xf * 127.0) / amax[..., None]
    xq = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5)).clamp(-127, 127).to(torch.int8)
    return xq, amax / 127.0


def int4_linear_reference(x, weight_packed, weight_scale, act: str = "a16", x_q=None, s_x=None):
    """float64 reference of the same quantized math (what the kernels must reproduce).
    act="a8": x is quantized per token first (or pass x_q, s_x to use given int8 activations)."""
    import torch
    k = x.shape[-1] if x is not None else x_q.shape[-1]
    q = unpack_int4_packed(weight_packed, k).double()
    g = scale_group_size(weight_scale, k)
    w = q * weight_scale.double().repeat_interleave(g, dim=1)
    if act == "a16":
        return x.double().reshape(-1, k) @ w.T
    if x_q is None:
        x_q, s_x = quantize_activations_int8(x.reshape(-1, k))
    return (x_q.double() @ w.T) * s_x.double()[:, None]


def relative_error(y, ref) -> float:
    """||y - ref|| / ||ref|| in float64 (Frobenius)."""
    ref = ref.double().cpu()
    return float((y.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300))


def triton_status() -> tuple[bool, str]:
    """(importable, version or why not). Running the kernels also needs a CUDA GPU with compute
    capability >= 8.0 (int8 MMA), or TRITON_INTERPRET=1 (CPU, slow, for tests)."""
    try:
        import triton
        return True, triton.__version__
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton not importable ({type(e).__name__}: {e})"


_TRITON_KERNELS = None


def _triton_kernels():
    """Compile-on-first-use kernels. `tl` is bound as a module global (not a local) on purpose:
    Triton resolves names in a kernel body through the module's globals, not closures."""
    global _TRITON_KERNELS
    if _TRITON_KERNELS is not None:
        return _TRITON_KERNELS
    import importlib
    triton = importlib.import_module("triton")
    globals()["tl"] = importlib.import_module("triton.language")

    @triton.jit
    def int8_rows_kernel(x_ptr, xq_ptr, sx_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
        """One program per token: absmax, then x_q = round_half_away(x * 127 / amax)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(xv.to(tl.float32)))
        a = tl.maximum(tl.max(amax, axis=0), 1e-8)  # INT8_ABSMAX_FLOOR
        a_vec = tl.zeros([BLOCK_K], dtype=tl.float32) + a
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            v = tl.math.div_rn(xv.to(tl.float32) * 127.0, a_vec)
            v = tl.minimum(tl.maximum(v + tl.where(v >= 0, 0.5, -0.5), -127.0), 127.0)
            tl.store(xq_ptr + row * stride_qm + k0 + offs, v.to(tl.int32).to(tl.int8), mask=k0 + offs < K)
        tl.store(sx_ptr + row, a / 127.0)

    @triton.jit
    def int4_gemm_kernel(x_ptr, sx_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, KW,
                         stride_xm, stride_wn, stride_sn, stride_ym,
                         A_MODE: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                         GROUPS_PER_ITER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         QBLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """y = x @ dequant(W).T for pack-quantized int4 W.
        A_MODE 0: x fp16/bf16 (W4A16). 1: x int8 + s_x from int8_rows_kernel (W4A8).
        2: x fp16/bf16, quantized per token inside this kernel (W4A8, one launch: each program
           re-reads its BLOCK_M rows to find their absmax; cheap while BLOCK_M * K is small).
        One tl.dot spans GROUP inputs (the scale group, or a K tile when PER_CHANNEL) so the
        integer sum of a group is exact before its scale is applied in fp32."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pids_in_band = GROUP_M * num_pid_n      # band of GROUP_M row-blocks: reuse W through L2
        band = pid // pids_in_band
        first_m = band * GROUP_M
        band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % pids_in_band) % band_m
        pid_n = (pid % pids_in_band) // band_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        shifts = (tl.arange(0, 8) * 4)[None, None, :]

        if A_MODE == 2:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, QBLOCK_K):
                offs = k0 + tl.arange(0, QBLOCK_K)
                xv = tl.load(x_rows + offs[None, :], mask=m_mask[:, None] & (offs[None, :] < K), other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(xv.to(tl.float32)), axis=1))
            amax = tl.maximum(amax, 1e-8)  # INT8_ABSMAX_FLOOR
            s_x = amax / 127.0
        if A_MODE == 1:
            s_x = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if PER_CHANNEL:
            if A_MODE == 0:
                acc_k = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            else:
                acc_k = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, GROUP * GROUPS_PER_ITER):
            for j in tl.static_range(GROUPS_PER_ITER):
                kg = k0 + j * GROUP
                offs_k = kg + tl.arange(0, GROUP)
                a = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0)
                if A_MODE == 2:
                    v = tl.math.div_rn(a.to(tl.float32) * 127.0, tl.zeros([BLOCK_M, GROUP], dtype=tl.float32) + amax[:, None])
                    v = tl.minimum(tl.maximum(v + tl.where(v >= 0, 0.5, -0.5), -127.0), 127.0)
                    a = v.to(tl.int32).to(tl.int8)
                # W tile as stored: [BLOCK_N, GROUP/8] words, contiguous per row (vector loads),
                # unpacked by broadcasting 8 shifts: [BLOCK_N, GROUP/8, 8] -> [BLOCK_N, GROUP].
                offs_w = kg // 8 + tl.arange(0, GROUP // 8)
                wp = tl.load(w_rows + offs_w[None, :], mask=n_mask[:, None] & (offs_w[None, :] < KW), other=0)
                q = tl.reshape((wp[:, :, None] >> shifts) & 0xF, (BLOCK_N, GROUP)) - 8
                if A_MODE == 0:
                    part = tl.dot(a, tl.trans(q.to(tl.float32).to(a.dtype)))  # via fp32: exact, any dtype
                else:
                    part = tl.dot(a, tl.trans(q.to(tl.int8)), out_dtype=tl.int32)
                if PER_CHANNEL:
                    acc_k += part
                else:
                    s = tl.load(ws_ptr + offs_n * stride_sn + kg // GROUP, mask=n_mask & (offs_n * 0 + kg < K), other=0.0)
                    acc += part.to(tl.float32) * s.to(tl.float32)[None, :]
        if PER_CHANNEL:
            s = tl.load(ws_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
            acc = acc_k.to(tl.float32) * s.to(tl.float32)[None, :]
        if A_MODE != 0:
            acc = acc * s_x[:, None]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    _TRITON_KERNELS = {"int8_rows": int8_rows_kernel, "int4_gemm": int4_gemm_kernel}
    return _TRITON_KERNELS


@dataclass
class Int4GemmConfig:
    """Launch parameters. Chosen per M bucket (no autotuning: the first call must be fast and the
    choice reproducible); `verify-runtime --bench --sweep` times the alternatives."""
    block_m: int
    block_n: int
    k_per_iter: int        # K consumed per loop iteration (several scale groups at small M)
    fuse_act_quant: bool   # A8: quantize activations inside the GEMM (one launch) vs own kernel
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    def label(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.k_per_iter}w{self.num_warps}s{self.num_stages}"
                + ("F" if self.fuse_act_quant else ""))


def int4_gemm_config(m: int, n: int, k: int) -> Int4GemmConfig:
    """At M <= 16 the GEMM streams int4 weights (bandwidth-bound): narrow N tiles for enough
    programs, a long K step for enough bytes in flight, activation quantization fused (the A
    tile is tiny). At large M it is compute-bound: big tiles, int8 tensor cores, separate quant."""
    if m <= 16:
        return Int4GemmConfig(16, 32 if n >= 2048 else 16, 256, True, num_warps=4, num_stages=3)
    if m <= 64:
        return Int4GemmConfig(m if m in (32, 64) else (32 if m <= 32 else 64), 64 if n >= 2048 else 32,
                              256, m <= 32, num_warps=4, num_stages=3)
    if m <= 256:
        return Int4GemmConfig(64, 128, 128, False, num_warps=4, num_stages=3)
    return Int4GemmConfig(128, 128, 128, False, num_warps=8, num_stages=3)


def int4_linear(x, weight_packed, weight_scale, act: str = "a8", bias=None,
                config: Int4GemmConfig | None = None):
    """y = x @ W.T (+ bias) with W in compressed-tensors pack-quantized int4 (symmetric).
    x: [..., K] fp16/bf16 on a CUDA device (or CPU under TRITON_INTERPRET=1); act "a8" (per-token
    int8 activations, int8 tensor cores) or "a16". Output dtype = x dtype."""
    import torch
    assert act in ("a8", "a16"), act
    k = x.shape[-1]
    n = weight_packed.shape[0]
    assert weight_packed.dtype == torch.int32 and weight_packed.shape[1] == -(-k // 8), \
        f"weight_packed {tuple(weight_packed.shape)} does not match K={k}"
    assert x.dtype in (torch.float16, torch.bfloat16), f"x must be fp16/bf16, got {x.dtype}"
    group = scale_group_size(weight_scale, k)
    per_channel = weight_scale.shape[-1] == 1
    if per_channel:
        dot_k = 128
    else:
        assert group & (group - 1) == 0 and group >= (32 if act == "a8" else 16), \
            f"group size {group}: the kernel takes powers of two >= {32 if act == 'a8' else 16}"
        dot_k = group
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    wp = weight_packed if weight_packed.stride(-1) == 1 else weight_packed.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    cfg = config or int4_gemm_config(m, n, k)
    kern = _triton_kernels()
    per_iter = max(1, cfg.k_per_iter // dot_k)
    if act == "a16":
        mode, xa, sx = 0, x2, x2
    elif cfg.fuse_act_quant:
        mode, xa, sx = 2, x2, x2
    else:
        mode = 1
        xa = torch.empty(m, k, device=x.device, dtype=torch.int8)
        sx = torch.empty(m, device=x.device, dtype=torch.float32)
        kern["int8_rows"][(m,)](x2, xa, sx, k, x2.stride(0), xa.stride(0), BLOCK_K=1024, num_warps=4)
    grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n),)
    kern["int4_gemm"][grid](
        xa, sx, wp, weight_scale, y, m, n, k, wp.shape[1],
        xa.stride(0), wp.stride(0), weight_scale.stride(0), y.stride(0),
        A_MODE=mode, GROUP=dot_k, PER_CHANNEL=per_channel, GROUPS_PER_ITER=per_iter,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, QBLOCK_K=256, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], n)


def cmd_install_kernel(args: argparse.Namespace) -> int:
    raise UserError("install-kernel is not implemented yet", exit_code=2)


def cmd_verify_runtime(args: argparse.Namespace) -> int:
    raise UserError("verify-runtime is not implemented yet", exit_code=2)


##### 7. CLI #####

EXAMPLES = """\
examples:
  # 1. MXFP4 -> BF16, streaming shard by shard (needs ~ one shard of RAM, 234 GB of disk for 120b)
  %(prog)s dequantize --src openai/gpt-oss-120b --dst ./gpt-oss-120b-bf16 --dtype bf16
  # 2. GPTQ W4A16 on experts and attention
  %(prog)s quantize --model-in ./gpt-oss-120b-bf16 --experts w4a16 --mw w4a16
  # 3. the W4A8 runtime
  %(prog)s install-kernel --yes && %(prog)s verify-runtime --bench --shapes gpt-oss
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="compress_gptoss.py", formatter_class=fmt, epilog=EXAMPLES,
                                description="Dequantize GPT-OSS MXFP4 to BF16/FP16 and re-quantize it with "
                                            "GPTQ/AWQ (W4A16, W8A8, W4A8, 2:4) through LLM Compressor.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           title="commands (COMMAND --help for each)")

    d = sub.add_parser("dequantize", formatter_class=fmt, help="MXFP4 -> BF16/FP16 checkpoint, streaming",
                       description="Convert an MXFP4 GPT-OSS checkpoint into a BF16/FP16 one that "
                                   "transformers' GptOssForCausalLM loads unquantized. Streams tensor by "
                                   "tensor: peak RAM is a few hundred MB whatever the model size.",
                       epilog="""\
examples:
  %(prog)s --src openai/gpt-oss-20b --dst ./gpt-oss-20b-bf16 --dtype bf16
  %(prog)s --src ./gpt-oss-120b --dst ./gpt-oss-120b-bf16 --dtype bf16 --device cuda
  %(prog)s --src ./gpt-oss-120b --dst ./gpt-oss-120b-bf16 --dtype bf16 --resume   # after a crash
  %(prog)s --src ./gpt-oss-20b --dst ./ref --method transformers --device-map auto  # reference path

BF16 is exact (every MXFP4 value is representable). FP16 is not: scales reach beyond its range,
so values that would overflow are counted and refused unless --fp16-overflow says otherwise.""")
    d.add_argument("--src", default="openai/gpt-oss-120b", metavar="PATH|HUB_ID",
                   help="MXFP4 model folder, or a Hub id fetched with huggingface_hub (default: %(default)s)")
    d.add_argument("--dst", default="gpt-oss-120b-bf16", metavar="DIR", help="output folder (default: %(default)s)")
    d.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16",
                   help="output dtype; bf16 is exact, fp16 may overflow (default: %(default)s)")
    d.add_argument("--method", choices=["stream", "transformers"], default="stream",
                   help="stream: shard by shard (default); transformers: load the whole model with "
                        "Mxfp4Config(dequantize=True), for comparison (needs the model's size in RAM)")
    d.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where the MXFP4 decode runs (stream method; default: GPU if present)")
    d.add_argument("--fp16-overflow", choices=["error", "clamp", "inf"], default="error",
                   help="with --dtype fp16, values beyond +-65504: stop (default), saturate, or write inf")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    d.add_argument("--resume", action="store_true",
                   help="finish an interrupted run in --dst: complete shards are checked and kept")
    d.add_argument("--device-map", choices=["auto", "sequential", "cpu-only"], default="sequential",
                   help="--method transformers: accelerate placement (default: %(default)s)")
    d.add_argument("--offload-folder", metavar="DIR", help="--method transformers: spill weights to disk here")
    d.add_argument("--max-gpu-memory", metavar="SIZE", help="--method transformers: per-GPU cap, e.g. 20GiB")
    d.set_defaults(func=cmd_dequantize)

    q = sub.add_parser("quantize", formatter_class=fmt, help="GPTQ/AWQ compression through LLM Compressor")
    q.set_defaults(func=cmd_quantize)

    k = sub.add_parser("install-kernel", formatter_class=fmt, help="install the QQQ W4A8 GEMM")
    k.set_defaults(func=cmd_install_kernel)

    v = sub.add_parser("verify-runtime", formatter_class=fmt, help="check GPU, CUDA and W4A8 runtimes")
    v.set_defaults(func=cmd_verify_runtime)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; --resume continues where it stopped (dequantize)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
