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


def _mxfp4_triton_kernel():
    """Fused decode + scale + transpose + bf16 cast: one pass, ~2.5 bytes moved per value.

    transformers' decoder makes several full-size temporaries (index tensors, the float copy, the
    transpose), which is why it runs at ~110 GB/s on an H200; this is written by hand for that.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(blocks_ptr, scales_ptr, out_ptr, O, K, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        po, pk, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        half, groups = K // 2, K // 32
        offs_o = po * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_b = pk * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        offs_g = pk * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        mask_o = offs_o[:, None] < O
        byte = tl.load(blocks_ptr + e * O * half + offs_o[:, None] * half + offs_b[None, :],
                       mask=mask_o & (offs_b[None, :] < half), other=0).to(tl.int32)
        code = tl.join(byte & 15, byte >> 4).reshape(BLOCK_O, BLOCK_K)  # low nibble first
        s = tl.load(scales_ptr + e * O * groups + offs_o[:, None] * groups + offs_g[None, :],
                    mask=mask_o & (offs_g[None, :] < groups), other=127).to(tl.int32)
        s = tl.broadcast_to(s[:, :, None], (BLOCK_O, BLOCK_K // 32, 32)).reshape(BLOCK_O, BLOCK_K)
        # The bf16 bits are built with integer ops, so no float unit can flush a subnormal:
        # E2M1 magnitude = M * 2^P with M in {2, 3}, times 2^(s-127) -> biased exponent P + 1 + s.
        ex, m = (code >> 1) & 3, code & 1
        mbit = tl.where(ex == 0, 0, m)
        biased = tl.where(ex == 0, -1, ex - 1) + s
        normal = (biased << 7) | (mbit << 6)
        subnormal = (2 + mbit) << tl.maximum(biased + 5, 0)   # exact: biased >= -1
        bits = tl.where(biased >= 255, 0x7F80, tl.where(biased >= 1, normal, subnormal))
        bits = tl.where((code & 7) == 0, 0, bits) | ((code >> 3) << 15)
        vals = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
        offs_k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + e * K * O + offs_k[:, None] * O + offs_o[None, :], tl.trans(vals),
                 mask=(offs_k[:, None] < K) & (offs_o[None, :] < O))

    return kernel


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def decode_mxfp4_to(blocks, scales, dtype):
    """blocks [E, out, G, 16] + scales [E, out, G] -> [E, G*32, out] in dtype (transformers' layout).

    On a CUDA tensor with triton and bf16 output, one fused kernel; otherwise torch ops (exact too).
    """
    import torch
    if blocks.is_cuda and dtype == torch.bfloat16 and _triton_available():
        E, O, G, _ = blocks.shape
        K = G * 32
        out = torch.empty((E, K, O), dtype=dtype, device=blocks.device)
        if "kernel" not in _LUT_CACHE:
            _LUT_CACHE["kernel"] = _mxfp4_triton_kernel()
        BO, BK = 64, 128
        grid = ((O + BO - 1) // BO, (K + BK - 1) // BK, E)
        _LUT_CACHE["kernel"][grid](blocks.contiguous(), scales.contiguous(), out, O, K, BLOCK_O=BO, BLOCK_K=BK)
        return out
    if dtype == torch.bfloat16:
        # Both bf16 values of a byte in one int32 gather; bf16 x 2^k is exact (computed in fp32,
        # rounded once), so this is the same bits in half the memory traffic of the fp32 path.
        key = f"pairs:{blocks.device}"
        if key not in _LUT_CACHE:
            _LUT_CACHE[key] = _byte_lut(blocks.device).to(dtype).contiguous().view(torch.int32).view(256)
        vals = _LUT_CACHE[key][blocks.int()].view(dtype).view(*blocks.shape[:-1], 32)
        vals = vals * torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.int() - 127).to(dtype).unsqueeze(-1)
        return vals.view(*blocks.shape[:-2], -1).transpose(1, 2).contiguous()
    return decode_mxfp4_blocks(blocks, scales, dtype).transpose(1, 2).to(dtype).contiguous()


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


# Rows of 16-byte blocks decoded per step: bounds the temporaries (~ 150 MB in bf16, 300 MB fp16).
DECODE_CHUNK_BLOCKS = 1 << 20
# Other tensors (the 1.2 GB embedding of 120b) are copied in row slices of at most this size.
PLAIN_CHUNK_BYTES = 64 << 20


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
                sl = handle(shards[0]).get_slice(spec.name)
                shape = sl.get_shape()
                row_bytes = max(1, spec.nbytes // max(1, shape[0])) if shape else spec.nbytes
                step = max(1, PLAIN_CHUNK_BYTES // row_bytes)
                for r0 in range(0, shape[0], step) if shape else [None]:
                    t = sl[r0:r0 + step] if shape else handle(shards[0]).get_tensor(spec.name)
                    if t.is_floating_point():
                        t, rep = cast_checked(t, dtype, spec.name, overflow_mode)
                        report.add(rep)
                        if rep.overflow and overflow_mode == "error":
                            return report
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
                if dtype == torch.bfloat16:   # bf16 has fp32's range: nothing to count
                    vals = decode_mxfp4_to(blocks, scales, dtype)
                else:
                    vals = decode_mxfp4_blocks(blocks, scales, dtype)      # [e, out, in] float32
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


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags get one line (what is wrong, where to look), not argparse's usage dump."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = OneLineErrorParser(prog="compress_gptoss.py", formatter_class=fmt, epilog=EXAMPLES,
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
