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
# Plan (which Linear gets which scheme and group size) -> recipe (llmcompressor modifiers) ->
# calibration data -> oneshot -> a complete Hugging Face folder, written to a temp dir and renamed.
# GPT-OSS quirks of this stage, one home each: linearize_meta (experts as nn.Linear),
# resolve_group_size (2880 = 22.5 x 128 -> g64), gptoss_awq_mappings (router balanced with the experts),
# masked_gptq (2:4 kept through GPTQ), w4a8 packing (scheme_args).

ALGOS = ("gptq", "awq", "rtn")          # rtn: plain rounding (QuantizationModifier), the baseline
SPEC_ALIASES = {"int4": "W4A16", "w4a16": "W4A16", "int8": "W8A8", "w8a8": "W8A8", "w4a8": "W4A8"}
TYPE_SCHEMES = {"int4": ("w4a16", "w4a8"), "int8": ("w8a8",)}
GROUP_SIZE_FALLBACKS = (64, 32, 16)
DEFAULT_EXPERTS_REGEX = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"
# Never quantized: the router (GPT-OSS `mlp.router`, Mixtral/Qwen `mlp.gate`), embeddings, lm_head.
BASE_IGNORE = ["lm_head", r"re:.*embed_tokens$", r"re:.*mlp\.(router|gate)$"]
CALIB_EVAL_MIN = 4                       # held-out texts kept back from calibration when none are left
EVAL_MAX_TEXTS = 64                      # held-out texts scored for quality.json


def has_w4a8_runtime() -> bool:
    """True when a W4A8 GEMM can be used: QQQ's CUTLASS kernels, or our Triton kernel (section 6)."""
    if os.environ.get("_GPTOSS_TEST_NO_W4A8_RUNTIME"):  # tests only: a machine without either
        return False
    try:
        import QQQ  # noqa: F401
        log("W4A8 runtime: QQQ is importable")
        return True
    except ImportError:
        pass
    try:
        import triton  # noqa: F401
        log("W4A8 runtime: built-in Triton int4 x int8 backend (runs on a CUDA GPU with compute capability >= 8.0)")
        return True
    except ImportError:
        return False


def install_qqq(yes: bool) -> bool:
    """Stub: section 6 (Kernels + runtime) defines the real installer later in this file, which wins."""
    log("install_qqq: the QQQ installer is not available in this build (see `install-kernel`)")
    return False


def resolve_spec(dtype: str | None, scheme: str | None, shortcut: str | None, who: str) -> str:
    """--{who}-type/--{who}-scheme (or the --{who} shortcut) -> 'W4A16' | 'W8A8' | 'W4A8'."""
    if dtype or scheme:
        d, s = (dtype or "").lower(), (scheme or "").lower()
        if d and d not in TYPE_SCHEMES:
            raise UserError(f"--{who}-type {dtype}: unknown type, use int4 or int8")
        if s and s not in ("w4a16", "w4a8", "w8a8"):
            raise UserError(f"--{who}-scheme {scheme}: unknown scheme, use w4a16, w4a8 (int4) or w8a8 (int8)")
        d = d or ("int8" if s == "w8a8" else "int4")
        s = s or TYPE_SCHEMES[d][0]
        if s not in TYPE_SCHEMES[d]:
            raise UserError(f"--{who}-type {d} does not go with --{who}-scheme {s}: "
                            f"int4 takes w4a16 or w4a8, int8 takes w8a8")
        return s.upper()
    if shortcut:
        if shortcut.lower() not in SPEC_ALIASES:
            raise UserError(f"--{who} {shortcut}: unknown scheme, use int4|w4a16, w4a8 or int8|w8a8")
        return SPEC_ALIASES[shortcut.lower()]
    return "W4A16"


def resolve_group_size(in_features: int, requested: int) -> int | None:
    """Group size for one module: `requested` if it divides in_features, else the largest of
    64/32/16 that is <= requested and divides it; None = one scale per output channel."""
    if requested == -1:
        return None
    if in_features % requested == 0:
        return requested
    for g in GROUP_SIZE_FALLBACKS:
        if g <= requested and in_features % g == 0:
            return g
    return None


def matches_any(name: str, patterns: list[str]) -> bool:
    """compressed-tensors' own target matching ('re:' regex or a module name / class name)."""
    from compressed_tensors.utils import match_name
    return any(match_name(name, p) for p in patterns)


def linearize_meta(model) -> int:
    """Replace fused MoE expert modules by llmcompressor's per-expert nn.Linear form, weightless.

    Written by hand because llmcompressor's linearize_moe copies the fused weights, which meta
    tensors do not have; the classes are llmcompressor's own (GptOssLinearExperts for GPT-OSS).
    Call it under accelerate's init_empty_weights(). Returns the number of MoE blocks replaced.
    """
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes
    moes = get_non_linearized_moes(model)
    for name, module in moes:
        cls = LinearExperts2D.get_linear_experts_cls(type(module))
        model.set_submodule(name, cls(getattr(module, "config", model.config)))
    return len(moes)


def skeleton_model(config_dict: dict):
    """The model's architecture on the meta device (no weights read), experts linearized."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        linearize_meta(model)
    return model


@dataclass
class GroupPlan:
    """One group of Linear modules quantized alike ('experts' or 'mw' = the other model weights)."""
    name: str
    algo: str
    scheme: str
    modules: dict = field(default_factory=dict)        # module name -> (out_features, in_features)
    group_sizes: dict = field(default_factory=dict)    # module name -> int | None (per channel)

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.modules.values())

    def group_size_summary(self) -> dict:
        """'g64': 24 modules, 'channel': 2 ... (what the log and the metadata report)."""
        out: dict = {}
        for g in self.group_sizes.values():
            key = "channel" if g is None else f"g{g}"
            out[key] = out.get(key, 0) + 1
        return out


@dataclass
class QuantizePlan:
    model_dir: Path
    config: dict
    is_mxfp4: bool
    groups: list
    ignore: list
    output_dir: Path
    total_params: int
    adjusted: list = field(default_factory=list)       # (module, in_features, requested, used)
    sparse: str | None = None

    def group(self, name: str) -> GroupPlan:
        return next(g for g in self.groups if g.name == name)


def detect_experts_regex(names: list[str]) -> str | None:
    """--auto-detect-experts: a regex from the module names that hold experts, or None."""
    hits = [n for n in names if re.search(r"(^|\.)(experts?|moe)(\.|$)", n)]
    if not hits:
        return None
    container = re.search(r"(^|\.)(experts?|moe)(\.|$)", hits[0]).group(2)
    return rf"re:.*\.{container}\.\d+\..*"


def output_name(model_dir: Path, args, exp_spec: str, mw_spec: str, exp_algo: str, mw_algo: str) -> str:
    """The seed's naming rule: <base>[-2of4]-<EXPERTALGO>-<MWALGO>-experts-<spec>-mw-<spec>."""
    base = re.sub(r"[-_](bf16|fp16|fp32|mxfp4|dequantized)$", "", model_dir.resolve().name, flags=re.I)
    def spec(s):
        return {"W4A16": "int4-w4a16", "W4A8": "int4-w4a8", "W8A8": "int8-w8a8"}[s]
    parts = [base]
    if args.with_sparse:
        parts.append(args.mask.replace(":", "of"))
    parts += [exp_algo.upper(), mw_algo.upper(), "experts", spec(exp_spec), "mw", spec(mw_spec)]
    return "-".join(parts)


def check_w4a8(spec: str, who: str, args) -> str:
    """W4A8 needs a runtime that can run it; otherwise install it, fall back to W4A16, or stop."""
    if spec != "W4A8" or has_w4a8_runtime():
        return spec
    if args.try_install_qqq:
        ok = False
        if args.yes or (sys.stdin.isatty() and input("install the QQQ W4A8 kernels now? [y/N] ").strip().lower() in ("y", "yes")):
            ok = install_qqq(yes=True)
        if ok and has_w4a8_runtime():
            return spec
        log(f"{who}: the W4A8 runtime could not be installed")
    if args.allow_fallback:
        log(f"{who}: no W4A8 runtime (QQQ or triton): falling back to W4A16 (--allow-fallback)")
        return "W4A16"
    raise UserError(f"{who} W4A8 needs a W4A8 runtime (QQQ or triton) and none is installed: "
                    f"pass --try-install-qqq --yes to install it, or --allow-fallback to quantize W4A16 instead")


def make_plan(args, model_dir: Path) -> QuantizePlan:
    """Resolve every flag into a plan without reading any weight."""
    config = read_json(model_dir / "config.json", "not a Hugging Face model folder (no config.json)")
    qcfg = config.get("quantization_config") or {}
    is_mxfp4 = qcfg.get("quant_method") == "mxfp4"
    if qcfg and not is_mxfp4:
        raise UserError(f"{model_dir} is already quantized ({qcfg.get('quant_method')!r}): "
                        f"quantize starts from a BF16/FP16 (or MXFP4 GPT-OSS) checkpoint")
    for flag in ("algo", "experts_algo", "mw_algo"):
        v = getattr(args, flag)
        if v is not None and v.lower() not in ALGOS:
            raise UserError(f"--{flag.replace('_', '-')} {v}: unknown algorithm, use {', '.join(ALGOS)}")
    exp_algo = (args.experts_algo or args.algo).lower()
    mw_algo = (args.mw_algo or args.algo).lower()
    exp_spec = resolve_spec(args.experts_type, args.experts_scheme, args.experts, "experts")
    mw_spec = resolve_spec(args.mw_type, args.mw_scheme, args.mw, "mw")
    for who, algo, spec in (("experts", exp_algo, exp_spec), ("mw", mw_algo, mw_spec)):
        if algo == "awq" and spec != "W4A16":
            raise UserError(f"{who}: AWQ supports W4A16 (weight-only int4) only, not {spec}: "
                            f"use --{who}-algo gptq for {spec}")
    if args.group_size != -1 and args.group_size <= 0:
        raise UserError(f"--group-size {args.group_size}: pass a positive size (128, 64, ...) or -1 for per channel")
    if args.with_sparse and not re.fullmatch(r"\d+:\d+", args.mask or ""):
        raise UserError(f"--mask {args.mask}: use N:M, e.g. 2:4")
    if not 0 < args.sparsity < 1:
        raise UserError(f"--sparsity {args.sparsity}: pass a ratio between 0 and 1")
    exp_spec = check_w4a8(exp_spec, "experts", args)
    mw_spec = check_w4a8(mw_spec, "mw", args)

    try:
        model = skeleton_model(config)
    except Exception as e:  # unknown model_type, broken config: the user's model folder, not our bug
        raise UserError(f"{model_dir}/config.json: transformers cannot build this model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    import torch
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    total_params = sum(p.numel() for p in model.parameters())
    ignore = BASE_IGNORE + list(args.extra_ignore or [])
    experts_regex = args.experts_regex
    if args.auto_detect_experts and not experts_regex:
        experts_regex = detect_experts_regex(list(linears))
        log(f"--auto-detect-experts: {experts_regex or 'no expert modules found'}")
    experts_regex = experts_regex or DEFAULT_EXPERTS_REGEX
    if not experts_regex.startswith("re:"):
        experts_regex = "re:" + experts_regex
    try:
        re.compile(experts_regex[3:])
    except re.error as e:
        raise UserError(f"--experts-regex {args.experts_regex}: not a valid regex ({e})")
    groups = [GroupPlan("experts", exp_algo, exp_spec), GroupPlan("mw", mw_algo, mw_spec)]
    adjusted = []
    for name, m in linears.items():
        if matches_any(name, ignore):
            continue
        g = groups[0] if matches_any(name, [experts_regex]) else groups[1]
        g.modules[name] = (m.out_features, m.in_features)
        if g.scheme == "W8A8":
            g.group_sizes[name] = None          # int8 weights: one scale per output channel
            continue
        gs = resolve_group_size(m.in_features, args.group_size)
        g.group_sizes[name] = gs
        if args.group_size != -1 and gs != args.group_size:
            adjusted.append((name, m.in_features, args.group_size, gs))
    if not any(g.modules for g in groups):
        raise UserError(f"{model_dir}: no Linear module left to quantize (all ignored by {ignore})")
    if args.output_dir:
        out = Path(args.output_dir).expanduser()
    else:
        out = Path(output_name(model_dir, args, exp_spec, mw_spec, exp_algo, mw_algo))
    return QuantizePlan(model_dir, config, is_mxfp4, groups, ignore, out, total_params, adjusted,
                        args.mask if args.with_sparse else None)


def compact_targets(names: list[str], universe: list[str]) -> list[str]:
    """Few regexes that match exactly `names` among `universe` (layer / expert numbers -> \\d+),
    so a 120b recipe has a handful of targets instead of 13,000 module names."""
    by_pattern: dict = {}
    for n in names:
        by_pattern.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)", "#", n), []).append(n)
    out = []
    for pattern, members in by_pattern.items():
        rx = r"\d+".join(re.escape(p) for p in pattern.split("#"))
        if {u for u in universe if re.fullmatch(rx, u)} == set(members):
            out.append(f"re:^{rx}$")
        else:
            out += [f"re:^{re.escape(m)}$" for m in members]
    return out


def scheme_args(scheme: str, group_size: int | None, symmetric: bool) -> dict:
    """compressed-tensors scheme for one (scheme, group size); targets are added by the caller."""
    w = {"num_bits": 4, "type": "int", "symmetric": symmetric, "dynamic": False,
         "strategy": "channel" if group_size is None else "group"}
    if group_size is not None:
        w["group_size"] = group_size
    act = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
    if scheme == "W4A16":
        return {"weights": w}
    if scheme == "W8A8":
        return {"weights": {**w, "num_bits": 8, "symmetric": True, "strategy": "channel"} | {"group_size": None},
                "input_activations": act}
    # W4A8: int4 symmetric weights stored packed (8 per int32): the W4A8 kernels read exactly this
    # layout; left to itself compressed-tensors would pick int-quantized (one int8 per weight).
    return {"weights": {**w, "symmetric": True}, "input_activations": act, "format": "pack-quantized"}


def config_groups(groups: list, universe: list[str], symmetric: bool) -> dict:
    out = {}
    for g in groups:
        buckets: dict = {}
        for name, gs in g.group_sizes.items():
            buckets.setdefault(gs, []).append(name)
        for gs, names in sorted(buckets.items(), key=lambda kv: -(kv[0] or 0)):
            key = f"{g.name}_{g.scheme.lower()}_{'channel' if gs is None else f'g{gs}'}"
            out[key] = {"targets": compact_targets(sorted(names), universe), **scheme_args(g.scheme, gs, symmetric)}
    return out


def gptoss_awq_mappings(awq_groups: set[str]):
    """AWQ balance mappings for GPT-OSS.

    input_layernorm -> q/k/v (attention in the AWQ group). post_attention_layernorm -> the router
    AND every expert's gate/up: the norm's scale is divided out of the router's weight too, so
    routing is unchanged. Left out on purpose: v_proj -> o_proj (GQA: 64 query heads share 8 kv
    heads, v's outputs are not o's inputs 1:1) and up_proj -> down_proj (GPT-OSS computes
    (clamp(up) + 1) * glu(gate): scaling up is not undone by scaling down's columns).
    """
    from llmcompressor.modifiers.transform.awq import AWQMapping
    out = []
    if "mw" in awq_groups:
        out.append(AWQMapping(r"re:.*input_layernorm$",
                              [r"re:.*self_attn\.q_proj$", r"re:.*self_attn\.k_proj$", r"re:.*self_attn\.v_proj$"]))
    if "experts" in awq_groups:
        out.append(AWQMapping(r"re:.*post_attention_layernorm$",
                              [r"re:.*mlp\.router$", r"re:.*mlp\.experts\.\d+\.gate_proj$",
                               r"re:.*mlp\.experts\.\d+\.up_proj$"]))
    return out


def generic_awq_mappings(model, awq_modules: set[str]):
    """Other architectures: llmcompressor's own mappings, keeping those whose balance layers are
    in an AWQ group (a GPTQ/RTN group must not be rescaled under it)."""
    from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model
    names = [n for n, _ in model.named_modules()]
    keep = []
    for m in get_layer_mappings_from_model(model):
        hit = {n for n in names if matches_any(n, list(m.balance_layers))}
        if hit and hit <= awq_modules:
            keep.append(m)
    return keep


def build_modifiers(plan: QuantizePlan, args, model=None) -> list:
    """The llmcompressor recipe: [SparseGPT] [AWQ smoothing] [RTN/AWQ rounding] [GPTQ]."""
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    universe = sorted({n for g in plan.groups for n in g.modules} | set(_all_linear_names(plan, model)))
    active = [g for g in plan.groups if g.modules]
    mods = []
    if plan.sparse:
        targets = compact_targets(sorted(n for g in active for n in g.modules), universe)
        mods.append(SparseGPTModifier(sparsity=args.sparsity, mask_structure=plan.sparse, targets=targets,
                                      block_size=args.block_size, dampening_frac=args.dampening_frac,
                                      offload_hessians=args.offload_hessians))
    awq = [g for g in active if g.algo == "awq"]
    if awq:
        if plan.config.get("model_type") == "gpt_oss":
            mappings = gptoss_awq_mappings({g.name for g in awq})
        else:
            mappings = generic_awq_mappings(model, {n for g in awq for n in g.modules}) if model is not None else None
        mods.append(AWQModifier(mappings=mappings, offload_device=None, n_grid=args.awq_grid))
    rounding = [g for g in active if g.algo in ("awq", "rtn")]
    if rounding:
        mods.append(QuantizationModifier(config_groups=config_groups(rounding, universe, args.symmetric)))
    gptq = [g for g in active if g.algo == "gptq"]
    if gptq:
        mods.append(GPTQModifier(config_groups=config_groups(gptq, universe, args.symmetric),
                                 block_size=args.block_size, dampening_frac=args.dampening_frac,
                                 # activation ordering permutes columns: keep the 2:4 mask aligned
                                 actorder=None if plan.sparse else "static"))
    return mods


def _all_linear_names(plan: QuantizePlan, model) -> list[str]:
    import torch
    if model is None:
        model = skeleton_model(plan.config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def recipe_yaml(modifiers: list) -> str:
    from llmcompressor.recipe import Recipe
    return Recipe.from_modifiers(modifiers).yaml()


# ---- calibration data


def read_jsonl_texts(path: Path, tokenizer, flag: str) -> list[str]:
    """{"text": ...} or {"messages": [...]} (rendered with the model's chat template) per line."""
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: pass a .jsonl file")
    texts = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{flag} {path} line {no}: not valid JSON ({e.msg})")
                texts.append(row_to_text(row, tokenizer, f"{flag} {path} line {no}"))
        except UnicodeDecodeError:
            raise UserError(f"{flag} {path} is not UTF-8 text")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{flag} {path} holds no text: it needs {{\"text\": ...}} or {{\"messages\": [...]}} lines")
    return texts


def row_to_text(row, tokenizer, where: str) -> str:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{where}: \"messages\" needs a chat template, and the model has none: use \"text\"")
        try:
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        except Exception as e:
            raise UserError(f"{where}: the chat template cannot render these messages ({str(e).splitlines()[0][:120]})")
    if isinstance(row, dict) and isinstance(row.get("instruction"), str):   # open_platypus / alpaca style
        return f"### Instruction:\n{row['instruction']}\n\n### Response:\n{row.get('output', '')}"
    keys = list(row) if isinstance(row, dict) else type(row).__name__
    raise UserError(f"{where}: expected a \"text\" string or a \"messages\" list, got {keys}")


HUB_DATASETS = {"open_platypus": ("garage-bAInd/Open-Platypus", "train"),
                "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft"),
                "ultrachat_200k": ("HuggingFaceH4/ultrachat_200k", "train_sft")}


def load_hub_texts(name: str, tokenizer, limit: int) -> list[str]:
    """--dataset: a Hub dataset (or a local one `datasets` can open), rows rendered to text."""
    repo, split = HUB_DATASETS.get(name, (name, "train"))
    import itertools
    try:
        import datasets
        # streamed: only the rows we use are fetched (ultrachat_200k is ~1 GB whole)
        rows = list(itertools.islice(datasets.load_dataset(repo, split=split, streaming=True), limit))
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load --dataset {name} ({repo}) from the Hugging Face Hub ({reason}): "
                        f"offline? pass --calib-jsonl FILE with {{\"text\": ...}} or {{\"messages\": [...]}} lines")
    texts = [row_to_text(row, tokenizer, f"--dataset {name} row {i}") for i, row in enumerate(rows)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"--dataset {name} holds no text rows")
    return texts


def split_calibration(texts: list[str], n_calib: int, eval_texts: list[str] | None) -> tuple[list, list]:
    """(calibration texts, held-out texts for quality.json), disjoint: --eval-jsonl, else the texts
    after the first n_calib, else the last few texts held back from calibration."""
    if eval_texts is not None:
        return texts[:n_calib], eval_texts[:EVAL_MAX_TEXTS]
    if len(texts) - n_calib >= CALIB_EVAL_MIN:
        return texts[:n_calib], texts[n_calib:n_calib + EVAL_MAX_TEXTS]
    if len(texts) < 2:
        return texts, []
    hold = min(max(CALIB_EVAL_MIN, len(texts) // 10), len(texts) // 2)
    return texts[:-hold][:n_calib], texts[-hold:]


def tokenized_dataset(texts: list[str], tokenizer, max_len: int):
    from datasets import Dataset
    enc = tokenizer(texts, truncation=True, max_length=max_len, add_special_tokens=True)
    rows = [(i, a) for i, a in zip(enc["input_ids"], enc["attention_mask"]) if len(i) > 1]
    return Dataset.from_dict({"input_ids": [r[0] for r in rows], "attention_mask": [r[1] for r in rows]})


# ---- GPTQ that keeps a 2:4 mask


def masked_gptq():
    """Context in which llmcompressor's GPTQ keeps zero weights at zero (a SparseGPT mask).

    GPTQ spreads each column's rounding error over the columns after it, which refills pruned
    weights (80% of groups of 4 stay 2:4). Here a pruned weight is 'quantized' to 0 inside the
    GPTQ loop, so its error is compensated like any other: SparseGPT's joint prune+quantize step.
    Written by hand because llmcompressor 0.14's GPTQ has no mask option.
    """
    import contextlib
    import torch
    from compressed_tensors.quantization import QuantizationStrategy, fake_quantize
    from compressed_tensors.utils import patch_attr
    import llmcompressor.modifiers.gptq.base as gptq_base
    import llmcompressor.modifiers.gptq.gptq_quantize as gq
    from copy import copy
    state = {"mask": None}
    original_quantize_weight = gq.quantize_weight

    def quantize_weight(weights, hessians, *a, **k):
        state["mask"] = weights == 0                                     # [batch, rows, columns]
        try:
            return original_quantize_weight(weights, hessians, *a, **k)
        finally:
            state["mask"] = None

    def block_update(W1, Hinv1, Q1, Err1, losses1, *, scale, zero_point, global_scale, g_idx, quant_args, i1):
        # llmcompressor's eager gptq_block_update, plus the mask line
        qargs = copy(quant_args)
        qargs.strategy = QuantizationStrategy.CHANNEL
        eff, zp = gq.column_scale_window(scale, zero_point, global_scale, g_idx, quant_args,
                                         num_rows=W1.shape[-2], i1=i1, i2=i1 + W1.shape[-1])
        mask = state["mask"]
        for i in range(W1.shape[-1]):
            w = W1[:, :, i]
            q = fake_quantize(w.transpose(0, 1), eff[:, :, i].transpose(0, 1),
                              None if zp is None else zp[:, :, i].transpose(0, 1), qargs).transpose(0, 1)
            if mask is not None:
                q = torch.where(mask[:, :, i1 + i], torch.zeros_like(q), q)
            err = (w - q) / Hinv1[:, i, i][:, None]
            Q1[:, :, i] = q
            Err1[:, :, i] = err
            losses1[:, :, i] = err.square()
            W1[:, :, i:] -= err.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)

    stack = contextlib.ExitStack()
    stack.enter_context(patch_attr(gptq_base, "quantize_weight", quantize_weight))
    stack.enter_context(patch_attr(gq, "gptq_block_update", block_update))
    return stack


def cpu_safe_calibration():
    """AWQ pins its cached activations for faster host->GPU copies; torch refuses pin_memory
    without an accelerator ('Cannot access accelerator device'), so on a CPU-only machine the
    pinning is skipped (there is no copy to speed up)."""
    import contextlib
    import torch
    from compressed_tensors.utils import patch_attr
    from llmcompressor.pipelines.cache import IntermediatesCache
    if torch.accelerator.is_available():
        return contextlib.nullcontext()
    return patch_attr(IntermediatesCache, "pin_memory", lambda self, *a, **k: None)


# ---- the run


def load_model_for_quantization(model_dir: Path, device_map: str, offload_folder: str | None):
    """BF16 model with linearized experts (llmcompressor's load_context: offloading + MoE)."""
    import torch
    from transformers import AutoModelForCausalLM
    from llmcompressor.utils import load_context
    dm = {"cpu-only": "cpu", "sequential": "cpu", "auto": "auto_offload"}[device_map]
    kwargs = {"dtype": "auto", "device_map": dm}
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    with load_context():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if model.dtype not in (torch.bfloat16, torch.float16):
        model = model.to(torch.bfloat16)
    return model


def check_checkpoint_complete(model_dir: Path, config: dict) -> None:
    """Every tensor the architecture needs is in the files: transformers would otherwise initialise
    the missing ones at random and we would quantize a half-loaded model."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    have = set()
    for f in checkpoint_files(model_dir):
        if not f.exists():
            raise UserError(f"{model_dir}: shard {f.name} is missing: re-download or re-run dequantize")
        with open_safetensors(f) as h:
            have |= set(h.keys())
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    need = set(model.state_dict())
    if getattr(cfg, "tie_word_embeddings", False):
        need.discard("lm_head.weight")
    missing = sorted(need - have)
    if missing:
        raise UserError(f"{model_dir} lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}): "
                        f"an incomplete checkpoint; re-download it or re-run dequantize")


def dequantize_to_temp(model_dir: Path, tmp: Path) -> Path:
    """MXFP4 input: the streaming dequantize (section 3) into a temp folder, BF16 (exact)."""
    src = inspect_source(model_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    log(f"{model_dir} is MXFP4: dequantizing it to BF16 in {tmp} first "
        f"(run `compress_gptoss.py dequantize --src {model_dir} --dst DIR` once to reuse it)")
    import torch
    dequantize_stream(src, tmp, "bf16", pick_device("auto"), "error", False)
    weight_map = {s.name: p.name for p in plan_output(src, torch.bfloat16) for s in p.specs}
    finish_output(model_dir, tmp, src.config, "bf16", weight_map)
    return tmp


def print_plan(plan: QuantizePlan, modifiers: list, args) -> None:
    print(f"model:      {plan.model_dir}{'  (MXFP4: dequantized to BF16 on the fly)' if plan.is_mxfp4 else ''}")
    print(f"output dir: {plan.output_dir}")
    print(f"never quantized: {', '.join(plan.ignore)}")
    for g in plan.groups:
        frac = g.params / max(plan.total_params, 1)
        sizes = ", ".join(f"{v} x {k}" for k, v in g.group_size_summary().items()) or "-"
        print(f"{g.name:8s} {g.algo.upper():4s} {g.scheme:6s} {len(g.modules):6d} modules, "
              f"{g.params:,} params ({frac:.1%} of the model); group sizes: {sizes}")
    for name, inf, req, used in plan.adjusted[:20]:
        print(f"  group size {req} does not divide {name} ({inf} inputs): "
              f"{'per channel' if used is None else used}")
    if len(plan.adjusted) > 20:
        print(f"  ... {len(plan.adjusted) - 20} more modules adjusted")
    if plan.sparse:
        print(f"sparsity:   SparseGPT {plan.sparse} ({args.sparsity:.0%}) before quantization, mask kept by GPTQ")
    print("recipe:")
    print(recipe_yaml(modifiers))


def model_card(plan: QuantizePlan, args, quality: dict | None) -> str:
    rows = "\n".join(f"| {g.name} | {g.algo.upper()} | {g.scheme} | {len(g.modules)} | "
                     f"{', '.join(f'{v}x{k}' for k, v in g.group_size_summary().items()) or '-'} |"
                     for g in plan.groups)
    q = ""
    if quality and quality["heldout_tokens"]:
        q = (f"\n## Quality (held-out texts, {quality['heldout_tokens']} tokens)\n\n"
             f"perplexity {quality['perplexity']['source']:.3f} -> {quality['perplexity']['quantized']:.3f}, "
             f"mean KL {quality['kl_mean']:.5f}, top-1 agreement {quality['top1_agreement']:.3f}"
             + (f", same experts {quality['same_experts']:.3f}" if quality.get('same_experts') is not None else "")
             + ". Full numbers in `quality.json`.\n")
    return f"""---
base_model: {plan.model_dir.resolve().name}
library_name: transformers
tags: [compressed-tensors, llmcompressor, gptoss-compressor]
---
# {plan.output_dir.name}

Made with gptoss-compressor {__version__} (`compress_gptoss.py quantize`) through LLM Compressor
from `{plan.model_dir.resolve().name}`{' (MXFP4, dequantized to BF16 first)' if plan.is_mxfp4 else ''}.
Router, embeddings and lm_head are not quantized{'; ' + plan.sparse + ' sparsity (SparseGPT) in the quantized weights' if plan.sparse else ''}.

| group | algorithm | scheme | modules | group sizes |
|---|---|---|---|---|
{rows}

Calibration: {args.calib_jsonl or args.dataset}, {args.num_calibration_samples} samples x {args.max_seq_length} tokens.
The recipe is in `recipe.yaml`.
{q}
## Loading

The experts are stored per expert (`mlp.experts.N.gate_proj.weight_packed`, ...), which
`AutoModelForCausalLM.from_pretrained` does not know for GPT-OSS: it would leave the experts random.
Load it with:

```python
from compress_gptoss import load_quantized_model
model = load_quantized_model("{plan.output_dir.name}", decompress=True)   # or decompress=False
```
"""


def write_output_config(tmp: Path, plan: QuantizePlan, sparsity: dict | None, extra: dict) -> None:
    """config.json: every field of the source config, plus llmcompressor's quantization_config."""
    saved = read_json(tmp / "config.json", "save_pretrained wrote no config.json")
    qc = saved.get("quantization_config") or {}
    if sparsity:
        # compressed-tensors 0.19 writes sparsity_config {} ("removed for now"): record the 2:4
        # structure in its SparsityCompressionConfig schema ourselves.
        qc["sparsity_config"] = sparsity
    out = {k: v for k, v in plan.config.items() if k != "quantization_config"}
    for k in ("dtype", "torch_dtype"):
        if k in out:
            out[k] = "bfloat16" if out[k] in ("float32", None) else out[k]
    out["quantization_config"] = qc
    out["gptoss_compressor"] = extra
    write_json_atomic(tmp / "config.json", out)


def sparsity_report(tmp: Path, plan: QuantizePlan) -> dict:
    """Share of groups of M that hold >= M-N zeros, per sparsified module, read from the saved
    tensors (decompressed by compressed-tensors)."""
    n, m = (int(x) for x in plan.sparse.split(":"))
    weights = decompressed_weights(tmp)
    per, zeros, total = {}, 0, 0
    for g in plan.groups:
        for name in g.modules:
            w = weights[name]
            groups = (w.reshape(-1, m) == 0).sum(-1) >= (m - n)
            per[name] = float(groups.float().mean())
            zeros += int((w == 0).sum())
            total += w.numel()
    return {"share_of_groups_ok": min(per.values()) if per else 0.0, "modules": len(per),
            "global_sparsity": zeros / max(total, 1), "per_module_min": per}


def cmd_quantize(args: argparse.Namespace) -> int:
    t0 = time.time()
    if not args.verbose:
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    if args.device_map == "cpu-only":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""          # before torch initializes CUDA
    model_dir = resolve_model_dir(args.model_in, "--model-in")
    plan = make_plan(args, model_dir)
    out = plan.output_dir
    if out.exists() and not args.dry_run:
        if not args.overwrite:
            raise UserError(f"output dir {out} already exists: pass --overwrite to replace it or --output-dir DIR")
        if out.resolve() == model_dir.resolve() or out.resolve() in model_dir.resolve().parents:
            raise UserError(f"output dir {out} is the input model's folder: pick another --output-dir")
    for g in plan.groups:
        sizes = ", ".join(f"{v} x {k}" for k, v in g.group_size_summary().items()) or "-"
        log(f"{g.name}: {len(g.modules)} Linear -> {g.algo.upper()} {g.scheme} ({sizes})"
            + ("" if g.modules else "  [empty group: nothing matches]"))
    for name, inf, req, used in plan.adjusted[:6]:
        log(f"group size {req} does not divide {name}'s {inf} inputs: {'per channel' if used is None else f'g{used}'}")
    if len(plan.adjusted) > 6:
        log(f"... and {len(plan.adjusted) - 6} more modules with an adjusted group size (see --dry-run)")

    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise UserError(f"{model_dir}: no usable tokenizer ({type(e).__name__}): copy the tokenizer files into it")
    if args.calib_jsonl:
        texts = read_jsonl_texts(Path(args.calib_jsonl).expanduser(), tokenizer, "--calib-jsonl")
    elif not args.dry_run:
        texts = load_hub_texts(args.dataset, tokenizer, args.num_calibration_samples + 64)
    else:
        texts = []
    eval_texts = read_jsonl_texts(Path(args.eval_jsonl).expanduser(), tokenizer, "--eval-jsonl") if args.eval_jsonl else None
    calib, heldout = split_calibration(texts, args.num_calibration_samples, eval_texts)
    if args.dry_run:
        print_plan(plan, build_modifiers(plan, args, skeleton_model(plan.config)), args)
        if texts:
            print(f"calibration: {len(calib)} texts from {args.calib_jsonl or args.dataset}, held out for quality: {len(heldout)}")
        return 0

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    bf16_tmp = out.parent / f".{out.name}.bf16-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        src_dir = dequantize_to_temp(model_dir, bf16_tmp) if plan.is_mxfp4 else model_dir
        check_checkpoint_complete(src_dir, plan.config)
        ds = tokenized_dataset(calib, tokenizer, args.max_seq_length)
        log(f"calibration: {len(ds)} samples (<= {args.max_seq_length} tokens) from "
            f"{args.calib_jsonl or args.dataset}; {len(heldout)} held-out texts for quality.json")
        model = load_model_for_quantization(src_dir, args.device_map, args.offload_folder)
        modifiers = build_modifiers(plan, args, model)
        if args.offload_hessians and not plan.sparse:
            log("--offload-hessians: llmcompressor 0.14's GPTQ keeps Hessians of the current layer only; "
                "the flag applies to SparseGPT (--with-sparse)")
        import contextlib
        from llmcompressor import oneshot
        with contextlib.ExitStack() as stack:
            stack.enter_context(cpu_safe_calibration())
            if plan.sparse:
                stack.enter_context(masked_gptq())
            oneshot(model=model, processor=tokenizer, dataset=ds, recipe=modifiers,
                    num_calibration_samples=len(ds), max_seq_length=args.max_seq_length,
                    pipeline="basic" if args.no_sequential_update else "sequential",
                    moe_calibrate_all_experts=not args.routed_experts_only)
        log(f"oneshot done in {time.time() - t0:.1f} s; saving to {out}")
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), save_compressed=True)
        del model
        tokenizer.save_pretrained(str(tmp))
        copy_side_files(src_dir, tmp)                      # the source's tokenizer / template / generation config win
        sparsity = None
        extra = {"version": __version__, "source": str(model_dir.resolve()),
                 "groups": {g.name: {"algo": g.algo, "scheme": g.scheme, "modules": len(g.modules),
                                     "group_sizes": g.group_size_summary()} for g in plan.groups},
                 "group_size_requested": args.group_size,
                 "group_size_adjusted": [{"module": n, "in_features": i, "used": u} for n, i, _, u in plan.adjusted],
                 "calibration": {"source": args.calib_jsonl or args.dataset, "samples": len(ds),
                                 "max_seq_length": args.max_seq_length,
                                 "all_experts": not args.routed_experts_only}}
        write_output_config(tmp, plan, None, extra)
        if plan.sparse:
            rep = sparsity_report(tmp, plan)
            from compressed_tensors.config import DenseSparsityConfig
            sparsity = DenseSparsityConfig(global_sparsity=rep["global_sparsity"], sparsity_structure=plan.sparse,
                                           targets=sorted(n for g in plan.groups for n in g.modules),
                                           ignore=plan.ignore).model_dump()
            log(f"sparsity {plan.sparse}: {rep['share_of_groups_ok']:.2%} of the groups of "
                f"{plan.sparse.split(':')[1]} conform in the worst of {rep['modules']} modules, "
                f"global sparsity {rep['global_sparsity']:.1%}")
            if rep["share_of_groups_ok"] < 1:
                log(f"WARNING: the {plan.sparse} pattern did not survive in every module: see config.json")
            extra["sparsity"] = {k: v for k, v in rep.items() if k != "per_module_min"}
            write_output_config(tmp, plan, sparsity, extra)
        quality = None
        if not args.no_eval:
            quality = evaluate_quality(src_dir, tmp, plan, heldout, tokenizer, min(args.max_seq_length, 512))
            write_json_atomic(tmp / "quality.json", quality)
            print_quality_table(quality)
        (tmp / "README.md").write_text(model_card(plan, args, quality))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(bf16_tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    log(f"wrote {out}: {human_bytes(size)} of safetensors in {time.time() - t0:.1f} s, "
        f"peak RSS {human_bytes(peak_rss_bytes())}")
    print(out)
    return 0


##### 5. Loader + quality #####
# A folder written by `quantize` stores GPT-OSS's experts per expert (mlp.experts.N.gate_proj...),
# which transformers' GptOssForCausalLM (fused 3-D experts) does not know: from_pretrained would
# silently leave the experts random. The loader builds the BF16 architecture, linearizes the
# experts the way llmcompressor did, applies the quantization config, then loads tensors by name.


def checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).exists():
        index = read_json(path / INDEX_NAME, "")
        return [path / s for s in sorted(set(index.get("weight_map", {}).values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} holds no .safetensors file: not a checkpoint written by quantize")
    return files


def load_quantized_model(path, decompress: bool = False):
    """Load a quantized checkpoint written by `quantize` (GPT-OSS or any HF causal LM), on CPU.

    path: the output folder (config.json with a compressed-tensors quantization_config).
    decompress=False: weights stay compressed (int4 packed / int8 + scales); the first forward
        decompresses them (compressed-tensors' hook). decompress=True: dense BF16 weights now, with
        the quantization scheme still attached (activations of W8A8/W4A8 are fake-quantized).
    Returns the model in eval mode. Raises UserError when a tensor is missing or unexpected, so a
    half-loaded model is never returned.
    """
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    path = Path(path)
    config = read_json(path / "config.json", "not a model folder")
    qdict = config.get("quantization_config") or {}
    if qdict.get("quant_method") != "compressed-tensors":
        raise UserError(f"{path} is not a compressed-tensors checkpoint "
                        f"(quant_method {qdict.get('quant_method')!r}): load it with transformers directly")
    qconfig = QuantizationConfig.model_validate({k: v for k, v in qdict.items()
                                                 if k not in ("sparsity_config", "transform_config")})
    model = skeleton_model(config)
    apply_quantization_config(model, qconfig)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)            # the compressed parameter layout, still on meta
    expected = set(model.state_dict())
    seen, unexpected = set(), []
    for f in checkpoint_files(path):
        for name, t in load_file(str(f)).items():
            if name not in expected:
                unexpected.append(name)
                continue
            # set by name rather than load_state_dict: compress_model on meta does not know that an
            # asymmetric int4 zero point is stored packed (8 per int32), so its shape differs here
            owner, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            old = getattr(owner, attr)
            if isinstance(old, torch.nn.Parameter):
                setattr(owner, attr, torch.nn.Parameter(t, requires_grad=False))
            else:
                owner._buffers[attr] = t
            seen.add(name)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = {n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta}
    missing = sorted((expected - seen) & still_meta | still_meta)
    if missing or unexpected:
        raise UserError(f"{path}: {len(missing)} missing tensors ({', '.join(missing[:3])}) and "
                        f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}): not a checkpoint of this model")
    model.eval()
    if decompress:
        compressor.decompress_model(model)
    return model


def decompressed_weights(path: Path) -> dict:
    """{module name: dense float32 weight} of every quantized module, decompressed by the loader."""
    import torch
    model = load_quantized_model(path, decompress=True)
    return {n: m.weight.detach().float() for n, m in model.named_modules()
            if hasattr(m, "quantization_scheme") and isinstance(m, torch.nn.Linear)}


def load_reference_model(path: Path):
    """The unquantized source, as transformers loads it (fused experts for GPT-OSS): the reference."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, device_map="cpu").eval()


def router_recorder(model):
    """Hooks that record each MoE router's chosen experts per token: {layer name: [indices]}."""
    import torch
    records, handles = {}, []
    k = getattr(model.config, "num_experts_per_tok", None) or getattr(model.config, "experts_per_token", 2)
    moe = bool(getattr(model.config, "num_local_experts", 0) or getattr(model.config, "num_experts", 0))
    for name, m in model.named_modules():
        if moe and re.search(r"\.mlp\.(router|gate)$", name):
            def hook(mod, inp, out, name=name):
                idx = next((t for t in (out if isinstance(out, tuple) else (out,))
                            if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)
                if idx is None:
                    logits = out[0] if isinstance(out, tuple) else out
                    idx = logits.topk(k, dim=-1).indices
                records.setdefault(name, []).append(idx.reshape(-1, idx.shape[-1]).sort(-1).values)
            handles.append(m.register_forward_hook(hook))
    return records, handles


def quantized_fraction(path: Path, plan) -> dict:
    """Share of each group's weights (and of all parameters) stored quantized, read from the files:
    a module counts when its tensors are weight_packed (int4) or an int8 weight with a scale."""
    from safetensors import safe_open
    keys = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                keys[k] = (h.get_slice(k).get_dtype(), h.get_slice(k).get_shape())
    bits = {}
    def stored_bits(name):
        if name + ".weight_packed" in keys:
            return 4
        if keys.get(name + ".weight", ("",))[0] == "I8" and name + ".weight_scale" in keys:
            return 8
        return None
    out = {}
    qparams = 0
    for g in plan.groups:
        q = sum(o * i for n, (o, i) in g.modules.items() if stored_bits(n))
        out[g.name] = q / g.params if g.params else None
        qparams += q
        bits[g.name] = sorted({stored_bits(n) for n in g.modules if stored_bits(n)})
    out["all_parameters"] = qparams / max(plan.total_params, 1)
    out["stored_bits"] = bits
    return out


def evaluate_quality(src_dir: Path, q_dir: Path, plan, texts: list[str], tokenizer, max_len: int) -> dict:
    """quality.json: the source (transformers, unquantized) against the output reloaded from disk."""
    import math
    import torch
    t0 = time.time()
    if not texts:
        log("quality: no held-out text left (pass more calibration texts or --eval-jsonl); skipped the metrics")
    ref = load_reference_model(src_dir)
    qm = load_quantized_model(q_dir, decompress=True)
    rec_ref, h_ref = router_recorder(ref)
    rec_q, h_q = router_recorder(qm)
    nll_ref = nll_q = kl = agree = 0.0
    tokens = 0
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]
            if ids.shape[1] < 2:
                continue
            lr = ref(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            lq = qm(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            tgt = ids[0, 1:]
            nll_ref -= float(lr.gather(-1, tgt[:, None]).sum())
            nll_q -= float(lq.gather(-1, tgt[:, None]).sum())
            kl += float((lr.exp() * (lr - lq)).sum())
            agree += float((lr.argmax(-1) == lq.argmax(-1)).sum())
            tokens += len(tgt)
    for h in h_ref + h_q:
        h.remove()
    same = None
    if rec_ref and set(rec_ref) == set(rec_q):
        hits = total = 0
        for name in rec_ref:
            a, b = torch.cat(rec_ref[name]), torch.cat(rec_q[name])
            hits += int((a == b).all(-1).sum())
            total += a.shape[0]
        same = hits / max(total, 1)
    src_size = sum(p.stat().st_size for p in Path(src_dir).glob("*.safetensors"))
    q_size = sum(p.stat().st_size for p in Path(q_dir).glob("*.safetensors"))
    n = max(tokens, 1)
    return {
        "heldout_texts": len(texts), "heldout_tokens": tokens,
        "perplexity": {"source": math.exp(nll_ref / n) if tokens else None,
                       "quantized": math.exp(nll_q / n) if tokens else None},
        "kl_mean": kl / n if tokens else None,
        "top1_agreement": agree / n if tokens else None,
        "same_experts": same,
        "quantized_fraction": quantized_fraction(q_dir, plan),
        "size_bytes": {"source": src_size, "quantized": q_size, "ratio": q_size / max(src_size, 1)},
        "groups": {g.name: {"algo": g.algo, "scheme": g.scheme, "modules": len(g.modules),
                            "group_sizes": g.group_size_summary()} for g in plan.groups},
        "eval_seconds": round(time.time() - t0, 1),
    }


def print_quality_table(q: dict) -> None:
    f = q["quantized_fraction"]
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    rows = [("held-out tokens", str(q["heldout_tokens"])),
            ("perplexity source", num(q["perplexity"]["source"], ".3f")),
            ("perplexity quantized", num(q["perplexity"]["quantized"], ".3f")),
            ("mean KL(source||quantized)", num(q["kl_mean"], ".5f")),
            ("top-1 agreement", num(q["top1_agreement"], ".4f")),
            ("same experts routed", num(q["same_experts"], ".4f")),
            ("experts quantized", num(f.get("experts"), ".2%")),
            ("model weights quantized", num(f.get("mw"), ".2%")),
            ("all parameters quantized", num(f.get("all_parameters"), ".2%")),
            ("size", f"{human_bytes(q['size_bytes']['quantized'])} "
                     f"({q['size_bytes']['ratio']:.1%} of {human_bytes(q['size_bytes']['source'])})")]
    w = max(len(r[0]) for r in rows)
    print("quality (quality.json):", file=sys.stderr)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}", file=sys.stderr)


##### 6. Kernels + runtime #####


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

    q = sub.add_parser("quantize", formatter_class=fmt, help="GPTQ/AWQ compression through LLM Compressor",
                       description="Quantize a BF16/FP16 model (GPT-OSS, experts included, or any Hugging Face "
                                   "causal LM) with GPTQ / AWQ / RTN through LLM Compressor, in two groups: "
                                   "'experts' and 'model weights' (every other Linear: attention q/k/v/o). "
                                   "Router, embeddings and lm_head are never quantized. Writes a complete "
                                   "compressed-tensors folder, reloads it from disk and writes quality.json.",
                       epilog="""\
examples:
  %(prog)s --model-in ./gpt-oss-120b-bf16 --experts w4a16 --mw w4a16 --calib-jsonl calib.jsonl
  %(prog)s --model-in ./gpt-oss-120b-bf16 --experts-algo awq --experts w4a16 --mw-algo gptq --mw w8a8
  %(prog)s --model-in ./gpt-oss-120b-bf16 --with-sparse --experts-type int4 --experts-scheme w4a8 \\
      --mw-type int4 --mw-scheme w4a16 --allow-fallback
  %(prog)s --model-in openai/gpt-oss-20b --dry-run          # MXFP4 input: dequantized on the fly

support matrix: AWQ W4A16; GPTQ W4A16, W8A8, W4A8 (needs a W4A8 runtime: QQQ or triton);
RTN (plain rounding, the baseline) W4A16, W8A8, W4A8. AWQ W8A8/W4A8 are refused.""")
    q.add_argument("--model-in", default="gpt-oss-120b-bf16", metavar="PATH|HUB_ID",
                   help="BF16/FP16 model folder (from `dequantize`), an MXFP4 GPT-OSS folder (dequantized on "
                        "the fly), or a Hub id (default: %(default)s)")
    q.add_argument("--algo", default="gptq", type=str.lower, metavar="gptq|awq|rtn",
                   help="algorithm of both groups unless --experts-algo/--mw-algo say otherwise (default: %(default)s)")
    q.add_argument("--experts-algo", type=str.lower, metavar="gptq|awq|rtn", help="algorithm of the experts")
    q.add_argument("--mw-algo", type=str.lower, metavar="gptq|awq|rtn",
                   help="algorithm of the model weights (attention q/k/v/o, other Linear)")
    q.add_argument("--experts-type", metavar="int4|int8", help="experts weight type (int4: w4a16|w4a8, int8: w8a8)")
    q.add_argument("--experts-scheme", metavar="w4a16|w4a8|w8a8", help="experts scheme (default w4a16)")
    q.add_argument("--mw-type", metavar="int4|int8", help="model weights type")
    q.add_argument("--mw-scheme", metavar="w4a16|w4a8|w8a8", help="model weights scheme (default w4a16)")
    q.add_argument("--experts", metavar="SPEC", help="shortcut for the experts: int4|w4a16|w4a8|int8|w8a8")
    q.add_argument("--mw", metavar="SPEC", help="shortcut for the model weights: int4|w4a16|w4a8|int8|w8a8")
    q.add_argument("--auto-detect-experts", action="store_true",
                   help="find the expert modules from the module names (experts/expert/moe) instead of the "
                        "GPT-OSS default regex")
    q.add_argument("--experts-regex", metavar="REGEX",
                   help=f"modules of the experts group (default: {DEFAULT_EXPERTS_REGEX.replace('%', '%%')})")
    q.add_argument("--with-sparse", action="store_true",
                   help="prune with SparseGPT (N:M, --mask) before quantizing; the mask is kept through GPTQ")
    q.add_argument("--sparsity", type=float, default=0.5, metavar="RATIO", help="SparseGPT sparsity (default: %(default)s)")
    q.add_argument("--mask", default="2:4", metavar="N:M", help="SparseGPT mask structure (default: %(default)s)")
    q.add_argument("--group-size", type=int, default=128, metavar="SIZE",
                   help="int4 group size; a module whose inputs it does not divide gets the largest of 64/32/16 "
                        "that does (GPT-OSS: 2880 -> 64); -1 = per channel (default: %(default)s)")
    q.add_argument("--block-size", type=int, default=128, metavar="SIZE",
                   help="GPTQ/SparseGPT columns per block update (default: %(default)s)")
    q.add_argument("--dampening-frac", type=float, default=0.01, metavar="FRAC",
                   help="GPTQ/SparseGPT Hessian dampening, fraction of its mean diagonal (default: %(default)s)")
    q.add_argument("--symmetric", action="store_true",
                   help="symmetric int4 for W4A16 (W8A8 and W4A8 weights are always symmetric)")
    q.add_argument("--awq-grid", type=int, default=20, metavar="N",
                   help="AWQ: scale ratios tried per mapping (llmcompressor's n_grid); fewer is faster (default: %(default)s)")
    q.add_argument("--no-sequential-update", action="store_true",
                   help="calibrate every layer on the unquantized model's activations in one pass (llmcompressor "
                        "'basic' pipeline) instead of layer by layer on the already-quantized layers' outputs")
    q.add_argument("--offload-hessians", action="store_true",
                   help="keep SparseGPT's Hessians on the CPU between uses (GPTQ in llmcompressor 0.14 holds "
                        "the current layer's only)")
    q.add_argument("--routed-experts-only", action="store_true",
                   help="calibrate each expert on the tokens routed to it only (default: every expert sees "
                        "every token, so rarely picked experts still get a Hessian)")
    q.add_argument("--dataset", default="open_platypus", metavar="NAME",
                   help="calibration dataset on the Hugging Face Hub (open_platypus, ultrachat_200k or a repo "
                        "id; chat rows are rendered with the model's chat template) (default: %(default)s)")
    q.add_argument("--calib-jsonl", metavar="FILE",
                   help='local calibration file, {"text": ...} or {"messages": [...]} per line (overrides --dataset)')
    q.add_argument("--eval-jsonl", metavar="FILE",
                   help="held-out texts for quality.json (default: the calibration texts not used for calibration)")
    q.add_argument("--num-calibration-samples", type=int, default=256, metavar="N",
                   help="calibration samples (default: %(default)s)")
    q.add_argument("--max-seq-length", type=int, default=2048, metavar="LEN",
                   help="tokens per calibration sample (default: %(default)s)")
    q.add_argument("--output-dir", metavar="DIR",
                   help="output folder (default: <model>[-2of4]-<EXPERTALGO>-<MWALGO>-experts-<spec>-mw-<spec>)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--extra-ignore", action="append", default=[], metavar="PATTERN",
                   help="module name or 're:REGEX' left unquantized, on top of router/embeddings/lm_head (repeatable)")
    q.add_argument("--dry-run", action="store_true",
                   help="print the resolved plan (modules per group, group sizes, recipe, output dir); read no weight")
    q.add_argument("--no-eval", action="store_true", help="skip the reload + quality.json step")
    q.add_argument("--try-install-qqq", action="store_true",
                   help="W4A8 without a runtime: offer to install the QQQ kernels (install-kernel)")
    q.add_argument("--yes", action="store_true", help="answer yes to the install question")
    q.add_argument("--allow-fallback", action="store_true", help="W4A8 without a runtime: quantize W4A16 instead")
    q.add_argument("--device-map", choices=["auto", "sequential", "cpu-only"], default="sequential",
                   help="sequential: weights in CPU RAM, each layer onloaded to the GPU in turn (if any); "
                        "cpu-only: no GPU; auto: what does not fit in RAM goes to --offload-folder (default: %(default)s)")
    q.add_argument("--offload-folder", metavar="DIR", help="--device-map auto: spill weights to disk here")
    q.add_argument("--verbose", action="store_true", help="show llmcompressor's INFO log")
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
