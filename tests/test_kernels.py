"""The built-in int4 GEMM (section 7, the kernel library): layout helpers against compressed-tensors, and the Triton
kernels under TRITON_INTERPRET=1 (CPU) against a float64 reference of the same quantized math.

TRITON_INTERPRET must be set before triton is first imported (triton.language's own @jit helpers,
tl.max, tl.cdiv, are decided then) and compressed-tensors imports triton, so the kernel cases run
in ONE child process (`python tests/test_kernels.py CASE...`) started with the variable set; each
test reads its case's outcome. Shapes stay tiny: the interpreter runs every program in numpy."""
import inspect
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the child has no conftest
import compress_gptoss as c  # noqa: E402

TOL = 1e-3  # the target for every built-in mode; fp16 output rounding alone is ~2e-4
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def random_int4_layer(n, k, group, dtype=torch.float16, seed=0):
    """(weight_packed, weight_scale) with q uniform in [-8, 7]; group None = per channel."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    groups = 1 if group is None else k // group
    scale = (torch.rand(n, groups, generator=g) * 0.02 + 0.002).to(dtype)
    return c.pack_int4(q), scale


def random_moe_layers(experts, n, k, group, dtype=torch.float16, seed=0):
    """int4_moe's stacked (weight_packed [E, N, K/8], weight_scale [E, N, G]): expert e is
    random_int4_layer with seed + e."""
    layers = [random_int4_layer(n, k, group, dtype=dtype, seed=seed + e) for e in range(experts)]
    return torch.stack([w for w, _ in layers]), torch.stack([s for _, s in layers])


# ---- run in the interpreter child ----

REFERENCE_SHAPES = [  # (m, n, k, group, act)
    (3, 37, 2880, 32, "a8"),     # GPT-OSS K, group 32, fused activation quant (M <= 16 config)
    (5, 19, 2880, 64, "a8"),     # group 64
    (5, 37, 320, 64, "a16"),
    (3, 21, 2880, 32, "a16"),
    (3, 40, 320, None, "a8"),    # per channel: K tail masked (320 = 2.5 x 128)
    (1, 17, 320, None, "a16"),
    (1, 23, 640, 32, "a8"),      # M = 1: fused quantization over a 2-row tile, one valid row
    (70, 37, 320, 64, "a8"),     # M > 64: separate int8 quantization kernel + big tiles
    (70, 37, 320, None, "a8"),
    (33, 9, 320, 32, "a16"),
]


def shape_id(m, n, k, group, act):
    return f"m{m}_n{n}_k{k}_g{group or 'ch'}_{act}"


def check_reference(m, n, k, group, act):
    wp, ws = random_int4_layer(n, k, group, seed=m * 1000 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(torch.float16)
    y = c.int4_linear(x, wp, ws, act=act)
    assert y.shape == (m, n) and y.dtype == torch.float16
    err = c.relative_error(y, c.int4_linear_reference(x, wp, ws, act=act))
    assert err <= TOL, f"relative error {err:.2e}"
    return err


for _shape in REFERENCE_SHAPES:
    CASES["ref_" + shape_id(*_shape)] = (lambda s: lambda: check_reference(*s))(_shape)


@case
def batched_input_and_bias():
    wp, ws = random_int4_layer(24, 256, 32)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 256, generator=g).to(torch.float16)
    bias = torch.randn(24, generator=g).to(torch.float16)
    y = c.int4_linear(x, wp, ws.T.contiguous().T, act="a8", bias=bias)   # scales column-major: copied
    assert y.shape == (2, 3, 24)
    err = c.relative_error(y.reshape(6, 24), c.int4_linear_reference(x, wp, ws, act="a8") + bias.double())
    assert err <= TOL, err
    return err


@case
def every_config_bucket():
    """The configs int4_gemm_config picks for each M bucket (at M <= 32 for a graph and for eager
    calls; at M <= 16 N = 33 takes the 32-wide tiles), forced onto a small input, with group scales
    and per channel."""
    worst = 0.0
    for group in (64, None):
        wp, ws = random_int4_layer(33, 320, group)
        x = torch.randn(7, 320, generator=torch.Generator().manual_seed(11)).to(torch.float16)
        ref = c.int4_linear_reference(x, wp, ws, act="a8")
        for m_bucket, eager in ((1, False), (1, True), (16, False), (16, True), (32, False), (32, True), (64, False),
                                (128, False), (1024, False)):
            cfg = c.int4_gemm_config(m_bucket, 33 if m_bucket < 1024 else 4096, 320, per_channel=group is None,
                                     act="a8", eager=eager)
            rows = 1 if cfg.gemv else 7   # the M = 1 GEMV takes one row
            err = c.relative_error(c.int4_linear(x[:rows], wp, ws, act="a8", config=cfg), ref[:rows])
            assert err <= TOL, (cfg.label(), err)
            worst = max(worst, err)
    return worst


@case
def split_k_sums_and_leaves_workspace_clean():
    """Split-K (atomics into a shared fp32 workspace, or per-split slices; the last program writes
    y): several splits, more splits than K steps, both quantization modes, all three kernels,
    the two kinds interleaved; a second call must give the same y."""
    wp, ws = random_int4_layer(37, 1216, 64)   # 4.75 K steps of 256
    x = torch.randn(3, 1216, generator=torch.Generator().manual_seed(13)).to(torch.float16)
    worst = 0.0
    for act in ("a8", "a16"):
        ref = c.int4_linear_reference(x, wp, ws, act=act)
        C = c.Int4GemmConfig
        for cfg in (C(16, 16, 256, True, split_k=2, split_stores=False), C(16, 16, 256, False, split_k=4),  # atomics, slices
                    C(16, 16, 64, False, split_k=4, grouped=True, prefetch=True),
                    C(16, 16, 64, False, split_k=4, grouped=True, prefetch=True, split_stores=False),
                    C(16, 16, 512, True, split_k=8, w_lhs=False, split_stores=False),
                    C(16, 16, 128, False, split_k=3, w_lhs=False),
                    C(16, 16, 256, False, split_k=3, planar=True, w_lhs=False),
                    C(16, 16, 256, False, split_k=8, planar=True, split_stores=False)):
            y1 = c.int4_linear(x, wp, ws, act=act, config=cfg)
            y2 = c.int4_linear(x, wp, ws, act=act, config=cfg)
            err = c.relative_error(y1, ref)
            assert err <= TOL and c.relative_error(y2, ref) <= TOL, (act, cfg.label(), err)
            assert torch.equal(y1, y2) or not cfg.split_stores, cfg.label()   # slices: summed in one order
            worst = max(worst, err)
    part, count = c.SPLIT_K_WORKSPACE[("cpu", False)]
    assert not part.any() and not count.any()
    assert not c.SPLIT_K_WORKSPACE[("cpu", True)][1].any()   # the slices' counters
    return worst


def twice_within_tol(x, wp, ws, act, cfg, ref, planar=None):
    """int4_linear twice with one config: within TOL of ref, and the same bits the second time."""
    y1 = c.int4_linear(x, wp, ws, act=act, config=cfg, planar=planar)
    y2 = c.int4_linear(x, wp, ws, act=act, config=cfg, planar=planar)
    err = c.relative_error(y1, ref)
    assert err <= TOL and torch.equal(y1, y2), (ws.shape, act, cfg.label(), err)
    return err


@case
def grouped_kernel_every_switch():
    """int4_gemm_grouped_kernel: prefetch, fused activation quantization, several groups per
    iteration, split-K with more splits than groups, both operand orders; group 32 / 64 / 128 and
    per channel (K = 320: 2.5 chunks of 128, the tail masked); a second call gives the same y."""
    C = c.Int4GemmConfig
    worst = 0.0
    for group in (32, 64, 128, None):
        wp, ws = random_int4_layer(37, 640 if group == 128 else 320, group, seed=group or 7)
        k = wp.shape[1] * 8
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(5)).to(torch.float16)
        for act in ("a8", "a16"):
            ref = c.int4_linear_reference(x, wp, ws, act=act)
            for cfg in (C(16, 32, 64, True, split_k=4, grouped=True, prefetch=True),
                        C(16, 16, 64, False, split_k=16, grouped=True, prefetch=True, w_lhs=False),
                        C(16, 32, 256, True, split_k=2, grouped=True),
                        C(32, 16, 128, False, split_k=1, grouped=True, w_lhs=False)):
                worst = max(worst, twice_within_tol(x, wp, ws, act, cfg, ref))
    return worst


@case
def planar_kernel_every_switch():
    """int4_gemm_planar_kernel on int4_planar weights: group 32 / 64 / 128 and per channel, K = 320
    (a 256 chunk and a padded 64 tail) and 640, prefetch on and off, more splits than chunks, both
    operand orders, weights re-laid out by the caller or inside int4_linear; a second call gives the same y."""
    C = c.Int4GemmConfig
    worst = 0.0
    for group in (32, 64, 128, None):
        wp, ws = random_int4_layer(37, 640 if group == 128 else 320, group, seed=(group or 7) + 1)
        k = wp.shape[1] * 8
        planar = c.int4_planar(wp, k)
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(6)).to(torch.float16)
        for act in ("a8", "a16"):
            ref = c.int4_linear_reference(x, wp, ws, act=act)
            for cfg, given in ((C(16, 32, 256, False, split_k=2, prefetch=True, planar=True), planar),
                               (C(16, 16, 256, False, split_k=4, planar=True, w_lhs=False), planar),
                               (C(32, 16, 256, False, planar=True), None)):
                worst = max(worst, twice_within_tol(x, wp, ws, act, cfg, ref, planar=given))
    return worst


@case
def gemv_kernel_every_switch():
    """int4_gemv_kernel (M = 1 on the CUDA cores): A8 with x_q from int8_rows_kernel or quantized
    inside, A16; fp16 and bf16 x; group 32 / 64 / 128 and per channel; 2, 4 and 8 words per
    step; split-K with atomics, with slices, and with more splits than steps; prefetch on and off;
    K = 2880 (GPT-OSS) and K = 36 (rows not on 16 bytes, a padded last word)."""
    C = c.Int4GemmConfig
    worst = 0.0
    configs = (C(1, 16, 256, False, 4, 1, split_k=3, gemv=True, prefetch=True, split_stores=False),
               C(1, 32, 512, True, 4, 1, split_k=2, gemv=True),
               C(1, 16, 128, True, 2, 1, split_k=1, gemv=True, prefetch=True),
               C(1, 16, 128, False, 4, 1, split_k=16, gemv=True))
    for n, k, group in ((13, 2880, 64), (21, 640, 32), (19, 512, 128), (40, 320, None), (9, 36, None)):
        wp, ws = random_int4_layer(n, k, group, seed=n)
        for dtype, tol in ((torch.float16, TOL), (torch.bfloat16, 5e-3)):   # bf16: see bf16_activations_a8
            x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(dtype)
            for act in ("a8", "a16"):
                ref = c.int4_linear_reference(x, wp, ws.to(dtype), act=act)
                for cfg in configs if dtype == torch.float16 and k < 2880 else configs[:2]:
                    y1 = c.int4_linear(x, wp, ws.to(dtype), act=act, config=cfg)
                    y2 = c.int4_linear(x, wp, ws.to(dtype), act=act, config=cfg)
                    err = c.relative_error(y1, ref)
                    assert err <= tol and c.relative_error(y2, ref) <= tol, (n, k, group, dtype, act, cfg.label(), err)
                    assert torch.equal(y1, y2) or cfg.split_k > 1 and not cfg.split_stores, cfg.label()
                    worst = max(worst, err)
    wp, ws = random_int4_layer(21, 320, 40, seed=3)   # groups of 40: no GEMV tile, M = 1 falls back
    x = torch.randn(1, 320, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    err = c.relative_error(c.int4_linear(x, wp, ws, act="a8"), c.int4_linear_reference(x, wp, ws, act="a8"))
    assert err <= TOL and c.cached_int4_plan((1, 21, 320, 8, "a8", torch.float16, torch.device("cpu"), None,
                                               False)).kernel == "int4_gemm", err
    return max(worst, err)


@case
def codes_kernel_every_switch():
    """Large M: int4_codes_kernel (int4 -> int8 / fp16 codes, or the dequantized weights) then
    int4_codes_gemm_kernel: group 32 / 64 / 128 and per channel (K = 320, BLOCK_K 128: a tail
    padded for A8, masked for A16), rows and columns past M, N, both activation modes, codes
    buffers shared by two layers in a row."""
    C = c.Int4GemmConfig
    worst = 0.0
    for group in (32, 64, 128, None):
        k = 640 if group == 128 else 320
        layers = [random_int4_layer(n, k, group, seed=(group or 7) + n) for n in (37, 21)]
        x = torch.randn(70, k, generator=torch.Generator().manual_seed(8)).to(torch.float16)
        for act in ("a8", "a16"):
            for cfg in (C(64, 32, 128, False, codes=True), C(16, 16, 64, False, 4, 2, codes=True),
                        C(32, 16, 64, False, codes=True, dequant=True)):
                for wp, ws in layers:
                    y = c.int4_linear(x, wp, ws, act=act, config=cfg)
                    err = c.relative_error(y, c.int4_linear_reference(x, wp, ws, act=act))
                    assert err <= TOL, (group, act, cfg.label(), err)
                    worst = max(worst, err)
        wp, ws = layers[0]   # bf16 x: dequant falls back to the exact int codes (q * scale would round)
        xb, wsb = x.to(torch.bfloat16), ws.to(torch.bfloat16)
        ref = c.int4_linear_reference(xb, wp, wsb, act="a8")
        y = c.int4_linear(xb, wp, wsb, act="a8", config=C(32, 16, 64, False, codes=True, dequant=True))
        plan = c.INT4_PLANS[(70, wp.shape[0], k, wsb.shape[1], "a8", torch.bfloat16, x.device,
                              C(32, 16, 64, False, codes=True, dequant=True), False)]
        assert plan.kernel == "int4_codes_gemm" and not plan.cfg.dequant, plan.kernel
        err = c.relative_error(y, ref)
        assert y.dtype == torch.bfloat16 and err <= 5e-3, (group, err)   # bf16 output rounding: ~2e-3
    return worst


@case
def bench_job_check_only_on_cpu():
    """The bench's per-job code (weights, references, error) on the CPU, without timing."""
    worst = 0.0
    for backend, group, dtype, cfg in (("fp16", 64, "fp16", None), ("w4a8", 64, "fp16", None),
                                       ("w4a16", 32, "fp16", None), ("w4a8", None, "fp16", c.int4_gemm_config(1000, 37, 320))):
        job = {"backend": backend, "M": 3, "K": 320, "N": 37, "group": group, "dtype": dtype, "device": "cpu",
               "check_only": True, "config": cfg.__dict__ if cfg else None}
        r = c.bench_one(job, 1, False)
        assert r["rel_err"] <= TOL and r["copies"] == 1, (job, r)
        worst = max(worst, r["rel_err"])
    return worst


@case
def bf16_activations_a8():
    """A8 with bf16 x only does int8 dots, so it runs in the interpreter (A16 with bf16 does a bf16
    tl.dot, which the triton 3.9 interpreter computes wrongly; the GPU bench checks that one)."""
    wp, ws = random_int4_layer(19, 320, 32, dtype=torch.bfloat16)
    x = torch.randn(4, 320, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    y = c.int4_linear(x, wp, ws, act="a8")
    assert y.dtype == torch.bfloat16
    err = c.relative_error(y, c.int4_linear_reference(x, wp, ws, act="a8"))
    # bf16 output rounding alone is ~1.7e-3 relative; the interpreter casts fp32 -> bf16 by truncation
    # (a GPU rounds to nearest), which doubles it: y here is the float64 result truncated, bit for bit
    assert err <= 5e-3, err
    return err


@case
def moe_all_experts_in_one_launch():
    """int4_moe: rows sorted by expert, counts with an empty expert, one row, and experts longer
    than a row block (20 rows: blocks of 16 and 4; 70 rows: blocks of 64), group scales and per
    channel, A8 and A16, bias, the weights unpacked in registers or once per call (codes, with a
    scratch of two experts' int8 codes: batches of 2 experts for A8, 1 for A16), A8 quantized by
    int8_rows_kernel or inside the MoE kernel (bit for bit the same y); each expert's rows against
    float64 with that expert's weights."""
    worst = 0.0
    k, n = 192, 40
    scratch, c.MOE_CODES_BYTES = c.MOE_CODES_BYTES, 2 * n * k
    try:
        for counts in ([5, 0, 20, 1], [70, 3, 0, 9]):
            for group in (64, 32, None):
                wp, ws = random_moe_layers(len(counts), n, k, group, seed=10)
                bias = torch.randn(len(counts), n, generator=torch.Generator().manual_seed(15)).to(torch.float16)
                x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(16)).to(torch.float16)
                unfused = None
                for act, tiles, codes, fuse in (("a8", None, False, False), ("a8", None, False, True),
                                                ("a16", None, False, None),
                                                ("a8", (128, 128, 8, None), False, None),   # 128-row tiles
                                                ("a8", None, True, None), ("a16", None, True, None)):
                    c.CODES_WORKSPACE.clear()   # no codes left by an earlier call to read by mistake
                    y = c.int4_moe(x, counts, wp, ws, bias, act=act, tiles=tiles, codes=codes, fuse=fuse)
                    assert y.shape == (sum(counts), n) and y.dtype == torch.float16
                    if fuse is False:
                        unfused = y
                    elif fuse:   # quantized in the kernel: the same x_q and s_x as int8_rows_kernel's
                        assert torch.equal(y, unfused), (counts, group)
                    for (lo, hi), ref in c.int4_moe_reference(x, counts, wp, ws, bias, act=act).items():
                        err = c.relative_error(y[lo:hi], ref)
                        assert err <= TOL, (counts, group, act, codes, lo, err)
                        worst = max(worst, err)
    finally:
        c.MOE_CODES_BYTES = scratch
    return worst


@case
def moe_rows_routed_on_the_device():
    """int4_moe from each row's expert as a tensor (decode: nothing read back to the host) instead
    of counts: an expert with several rows, one row, a gap of unrouted experts, and all 16 rows of
    one row block on one expert; A8 fused and unfused, A16; bit for bit the y of the host table
    with the same tile, and the float64 result per expert; the first program alone writes only its
    expert's rows (fails if the kernel's row mask ignores the expert)."""
    worst = 0.0
    k, n = 128, 40
    for counts in ([1, 0, 2, 0, 0, 1], [0, 16, 0], [3, 1, 5, 0, 2, 0, 1, 4]):
        row_experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        for group in (64, None):
            wp, ws = random_moe_layers(len(counts), n, k, group, seed=50)
            bias = torch.randn(len(counts), n, generator=torch.Generator().manual_seed(51)).to(torch.float16)
            x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(52)).to(torch.float16)
            for act, fuse in (("a8", True), ("a8", False), ("a16", None)):
                tiles = (16, 64, 4, None)
                y = c.int4_moe(x, None, wp, ws, bias, act=act, tiles=tiles, fuse=fuse, row_experts=row_experts,
                               gemv=False)
                assert torch.equal(y, c.int4_moe(x, counts, wp, ws, bias, act=act, tiles=tiles, fuse=fuse)), \
                    (counts, group, act, fuse)
                for (lo, hi), ref in c.int4_moe_reference(x, counts, wp, ws, bias, act=act).items():
                    err = c.relative_error(y[lo:hi], ref)
                    assert err <= TOL, (counts, group, act, lo, err)
                    worst = max(worst, err)
            # program 0 alone writes its expert's rows and no others (the interpreter runs programs in
            # order, so a later expert's program would overwrite a wrong write above and hide it)
            first = next(rows for rows in counts if rows)
            y = torch.full((sum(counts), n), float("nan"), dtype=torch.float16)
            c.launch_int4_moe(c.triton_kernels(), (1, 1), x, x, wp, ws, None, y, row_experts, wp, 0, "a16",
                               c.moe_chunk(k, ws.shape[-1]), ws.shape[-1], False, False, True, (16, 64, 4, None))
            assert not y[:first].isnan().any() and y[first:].isnan().all(), (counts, group)
    return worst


@case
def moe_decode_gemv():
    """int4_moe's decode path on the CUDA cores (int4_moe_gemv_kernel, a row per program): the
    default at one token (4 rows); rows of four experts and of one expert twice, group 32 / 64 /
    128 and per channel (K = 2880 once), A8 fused and unfused, A16, with a bias: each expert's rows
    against float64; split-K with the bias added once, and a share with no steps."""
    worst = 0.0
    for counts, k, group in (([1, 0, 1, 1, 0, 1], 2880, 64), ([0, 2, 0, 1], 256, 32), ([1, 0, 0], 512, 128),
                             ([0, 1, 1, 0, 2], 320, None)):
        row_experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        wp, ws = random_moe_layers(len(counts), 24, k, group, seed=60)
        bias = torch.randn(len(counts), 24, generator=torch.Generator().manual_seed(61)).to(torch.float16)
        x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(62)).to(torch.float16)
        for act, fuse in (("a8", None), ("a8", False), ("a16", None)):
            y = c.int4_moe(x, None, wp, ws, bias, act=act, fuse=fuse, row_experts=row_experts,
                           tiles=None if k == 2880 else (16, 16, 2, 3))   # 3 shares of 2-5 steps: one empty
            for (lo, hi), ref in c.int4_moe_reference(x, counts, wp, ws, bias, act=act).items():
                err = c.relative_error(y[lo:hi], ref)
                assert err <= TOL, (counts, group, act, fuse, lo, err)
                worst = max(worst, err)
    return worst


@case
def moe_codes_only_for_long_prompts():
    """int4_moe's default unpacks into the codes scratch only when the routed experts average
    MOE_CODES_ROWS rows (a long prompt), not for a few rows per expert (decode, short prompts);
    both give the float64 result."""
    k, n = 64, 16
    wp, ws = random_moe_layers(3, n, k, 32, seed=30)
    worst = 0.0
    for counts, codes in (([3, 0, 1], False), ([c.MOE_CODES_ROWS, 0, c.MOE_CODES_ROWS + 1], True)):
        c.CODES_WORKSPACE.clear()
        x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(31)).to(torch.float16)
        y = c.int4_moe(x, counts, wp, ws, act="a8")
        assert bool(c.CODES_WORKSPACE) == codes, (counts, list(c.CODES_WORKSPACE))
        for (lo, hi), ref in c.int4_moe_reference(x, counts, wp, ws, act="a8").items():
            worst = max(worst, c.relative_error(y[lo:hi], ref))
    assert worst <= TOL, worst
    return worst


@case
def rejects_what_it_cannot_run():
    wp, ws = random_int4_layer(8, 320, 20)   # group 20: not a multiple of 8 (a packed word)
    try:
        c.int4_linear(torch.zeros(1, 320, dtype=torch.float16), wp, ws)
        raise RuntimeError("group 20 accepted")
    except AssertionError as e:
        assert "group size 20" in str(e), e
    wp, ws = random_int4_layer(8, 256, 32)
    try:
        c.int4_linear(torch.zeros(1, 320, dtype=torch.float16), wp, ws)
        raise RuntimeError("K mismatch accepted")
    except AssertionError as e:
        assert "does not match K" in str(e), e


def check_compressed_tensors(group, act, m=5):
    """Pack with compressed-tensors' own pack-quantized compressor (scales from its qparams), then:
    our dequantization == its decompression, and the kernel == x @ its decompressed weight
    (m = 70: the large-M path, weights unpacked once per call)."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    n, k = 29, 320
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    strategy = {"strategy": "channel"} if group is None else {"strategy": "group", "group_size": group}
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, **strategy)
    wg = w.float().reshape(n, -1, group or k)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    packed = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zp}, scheme)
    assert set(packed) == {"weight_packed", "weight_scale", "weight_shape"}, set(packed)  # symmetric: no zp
    w_ct = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    wp, ws = packed["weight_packed"], packed["weight_scale"]
    ours = c.unpack_int4_packed(wp, k).double() * ws.double().repeat_interleave(k // ws.shape[1], 1)
    assert torch.equal(ours.to(w_ct.dtype), w_ct)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.float16)
    y = c.int4_linear(x, wp, ws, act=act)
    if act == "a16":
        ref = x.double() @ w_ct.double().T
    else:
        xq, sx = c.quantize_activations_int8(x)
        ref = (xq.double() @ w_ct.double().T) * sx.double()[:, None]
    err = c.relative_error(y, ref)
    assert err <= 2e-3, err  # w_ct is q * scale rounded to fp16; the kernel's weights are exact
    return err


CT_CASES = [(64, "a16", 5), (32, "a8", 5), (None, "a8", 5), (64, "a16", 70), (32, "a8", 70), (None, "a8", 70)]
for _g, _act, _m in CT_CASES:
    CASES[f"ct_g{_g or 'ch'}_{_act}_m{_m}"] = (lambda g, a, m: lambda: check_compressed_tensors(g, a, m))(_g, _act, _m)


def run_cases(names):
    out = {}
    for name in names:
        try:
            out[name] = {"ok": True, "err": CASES[name]()}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()[-3000:]}
    return out


# ---- pytest side ----

@pytest.fixture(scope="module")
def interpreted():
    """Outcome of every case, from one TRITON_INTERPRET=1 child process."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve())] + list(CASES), env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel(interpreted, name):
    res = interpreted[name]
    assert res["ok"], res["msg"]


def test_pack_layout_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized import pack_to_int32, unpack_from_int32
    q = torch.randint(-8, 8, (7, 2880), dtype=torch.int8)
    packed = c.pack_int4(q)
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(c.unpack_int4_packed(packed, 2880), q)
    q_odd = torch.randint(-8, 8, (3, 36), dtype=torch.int8)  # K not a multiple of 8: padded word
    assert torch.equal(c.pack_int4(q_odd), pack_to_int32(q_odd, 4))
    assert torch.equal(c.unpack_int4_packed(pack_to_int32(q_odd, 4), 36),
                       unpack_from_int32(pack_to_int32(q_odd, 4), 4, torch.Size([3, 36])))


def test_activation_quantization_reference():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float16)
    xq, sx = c.quantize_activations_int8(x)
    assert xq.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0]]  # -63.5: half to even
    xq, _ = c.quantize_activations_int8(torch.tensor([[2.0, 0.5 / 127 * 2, 1.5 / 127 * 2]]))
    assert xq.tolist() == [[127, 0, 2]]
    assert torch.allclose(sx, torch.tensor([1 / 127, c.INT8_ABSMAX_FLOOR / 127]))
    # 127 / 3.224609375 rounded once to fp32 is 39.384617 (the kernels' div_rn); torch's `127.0 / t`
    # is 127 * (1 / t) = 39.384613, and 0.5966796875 times that is 23.499998, not 23.5 (-> 24, even)
    xq, _ = c.quantize_activations_int8(torch.tensor([[3.224609375, 0.5966796875]], dtype=torch.float16))
    assert xq.tolist() == [[127, 24]]


def lowered_ptx(kernel: str, consts: dict, x_dtype: str, cc: int, warps: int, stages: int,
                ws_dtype: str = "*fp16", ptrs: dict | None = None, aligned: bool = False) -> str:
    """PTX of one kernel lowered for sm_<cc> with triton's bundled ptxas (no GPU needed): the
    interpreter does not catch what only the GPU compiler rejects (dot shapes, layouts). Skips
    where this triton's compiler API differs. aligned: every pointer on 16 bytes, as Triton
    specializes a launch on torch's allocations."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"triton {triton.__version__} has no ASTSource/GPUTarget: {e}")
    kern = c.triton_kernels()[kernel]
    names = list(kern.arg_names)
    consts = {**{p.name: p.default for p in kern.params   # constexprs left out take their defaults (PDL off)
                 if p.is_constexpr and p.default is not inspect.Parameter.empty}, **consts}
    ptr = {"x_ptr": x_dtype, "sx_ptr": "*fp32", "w_ptr": "*i32", "q_ptr": x_dtype, "ws_ptr": ws_dtype,
           "y_ptr": "*bf16" if x_dtype == "*bf16" else "*fp16", "part_ptr": "*fp32", "count_ptr": "*i32",
           **(ptrs or {})}
    sig = {n: "constexpr" if n in consts else ptr.get(n, "i32") for n in names}
    try:
        src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()},
                        **({"attrs": {(names.index(n),): [["tt.divisibility", 16]] for n in names
                                      if sig[n].startswith("*")}} if aligned else {}))
    except TypeError as e:
        pytest.skip(f"triton {triton.__version__}: other ASTSource signature ({e})")
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": warps, "num_stages": stages}).asm["ptx"]


@pytest.mark.parametrize("cc", [80, 90])
def test_kernels_compile_for_gpus_without_a_gpu(cc):
    """The first kernel lowered for sm_80 / sm_90."""
    configs = [  # (A_MODE, GROUP, PER_CHANNEL, INT8_DOT, KW, BLOCK_M, BLOCK_N, SPLIT_K, warps, x dtype)
        (2, 64, False, False, 32, 16, 64, 4, 4, "*fp16"), (1, 32, False, False, 16, 128, 128, 1, 8, "*i8"),
        (1, 8, True, True, 32, 16, 32, 2, 4, "*i8"), (0, 128, False, False, 16, 64, 128, 2, 4, "*bf16"),
        (0, 8, True, False, 16, 128, 128, 1, 8, "*fp16")]
    for mode, group, per_ch, i8, kw, bm, bn, split, warps, xdt in (configs if cc == 90 else configs[:1]):
        consts = {"A_MODE": mode, "GROUP": group, "PER_CHANNEL": per_ch, "INT8_DOT": i8, "KW": kw, "W_LHS": bm != 64,
                  "BLOCK_M": bm,
                  "BLOCK_N": bn, "FUSE_ROWS": 4, "QBLOCK_K": 1024, "GROUP_M": 8, "SPLIT_K": split, "SPLIT_STORES": False}
        ptx = lowered_ptx("int4_gemm", consts, xdt, cc, warps, 3, ws_dtype="*bf16")
        assert ".s8.s8" in ptx or not i8   # int8 tensor-core MMA for per-channel W4A8


@pytest.mark.parametrize("cc", [80, 90])
def test_grouped_kernel_compiles_for_gpus_without_a_gpu(cc):
    """The one-dot-per-group kernel, every switch, lowered for sm_80 / sm_90: A8 must be an int8
    tensor-core MMA (.s8.s8 in the PTX) with or without groups."""
    configs = [  # (A8, FUSE, CHUNK, CHUNKS, PREFETCH, PER_CHANNEL, W_LHS, BLOCK_M, BLOCK_N, SPLIT_K, warps, x)
        (True, False, 64, 1, True, False, True, 16, 64, 8, 4, "*i8"),
        (True, True, 64, 1, True, False, True, 16, 64, 4, 4, "*fp16"),
        (True, True, 64, 1, False, True, True, 32, 64, 2, 4, "*fp16"),
        (True, False, 32, 2, False, False, False, 128, 128, 1, 8, "*i8"),
        (True, False, 64, 1, False, True, True, 16, 32, 2, 4, "*i8"),
        (False, False, 128, 1, True, False, True, 16, 64, 4, 4, "*bf16"),
        (False, False, 64, 2, False, True, False, 128, 64, 1, 4, "*fp16")]
    for a8, fuse, chunk, chunks, pre, per_ch, lhs, bm, bn, split, warps, xdt in (configs if cc == 90 else configs[:2]):
        consts = {"A8": a8, "FUSE": fuse, "FUSE_CHUNKS": 12 if fuse else 1, "CHUNK": chunk, "CHUNKS": chunks,
                  "PREFETCH": pre, "PER_CHANNEL": per_ch, "W_LHS": lhs, "BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "SPLIT_K": split,
                  "SPLIT_STORES": split > 1 and pre}
        ptx = lowered_ptx("int4_gemm_grouped", consts, xdt, cc, warps, 4)
        assert (".s8.s8" in ptx) == a8, (consts, "int8 MMA expected exactly for A8")


def test_planar_layout():
    """int4_planar against its definition, element by element: chunk c, word w, nibble j holds
    q[256 c + 32 j + w] + 8, and 8 (q = 0) past K."""
    q = torch.randint(-8, 8, (3, 320), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    planar = c.int4_planar(c.pack_int4(q), 320)
    assert planar.shape == (3, 64) and planar.dtype == torch.int32
    for row in range(3):
        for chunk in range(2):
            for w in range(32):
                word = int(planar[row, chunk * 32 + w]) & 0xFFFFFFFF
                for j in range(8):
                    k = 256 * chunk + 32 * j + w
                    assert (word >> (4 * j)) & 0xF == (int(q[row, k]) + 8 if k < 320 else 8), (row, k)


@pytest.mark.parametrize("cc", [80, 90])
def test_planar_kernel_compiles_for_gpus_without_a_gpu(cc):
    """The planar kernel lowered for sm_80 / sm_90: A8 is an int8 tensor-core MMA, A16 is not."""
    configs = [  # (A8, BF16, GROUP, PREFETCH, W_LHS, BLOCK_M, BLOCK_N, SPLIT_K, warps, x)
        (True, False, 64, True, True, 16, 64, 4, 4, "*i8"), (False, False, 32, False, True, 16, 64, 4, 4, "*fp16"),
        (True, False, 0, False, False, 128, 128, 1, 8, "*i8"), (False, True, 128, True, False, 64, 128, 1, 4, "*bf16")]
    for a8, bf16, group, pre, lhs, bm, bn, split, warps, xdt in (configs if cc == 90 else configs[:2]):
        consts = {"A8": a8, "BF16": bf16, "GROUP": group, "X_PADDED": a8, "PREFETCH": pre, "W_LHS": lhs,
                  "BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "SPLIT_K": split, "SPLIT_STORES": split > 1 and a8}
        ptx = lowered_ptx("int4_gemm_planar", consts, xdt, cc, warps, 3)
        assert (".s8.s8" in ptx) == a8, (consts, "int8 MMA expected exactly for A8")


@pytest.mark.parametrize("cc", [80, 90])
def test_gemv_kernel_compiles_for_gpus_without_a_gpu(cc):
    """The M = 1 kernel lowered for sm_80 / sm_90: no MMA (CUDA cores), and at K % 32 == 0 (W_ALIGN 4)
    the weights load as 16-byte vectors; at W_ALIGN 1 Triton cannot know that and loads words one by one."""
    configs = [  # (A8, FUSE, GROUP_W, PREFETCH, BLOCK_N, BLOCK_W, W_ALIGN, SPLIT_K, SPLIT_STORES, warps, x)
        (True, False, 8, True, 32, 32, 4, 4, False, 4, "*i8"), (True, True, 8, True, 32, 32, 4, 4, False, 4, "*bf16"),
        (False, False, 4, True, 64, 32, 4, 2, True, 4, "*fp16"), (True, False, 0, False, 16, 64, 4, 8, False, 4, "*i8"),
        (False, False, 0, True, 32, 32, 1, 1, False, 2, "*bf16")]
    for a8, fuse, gw, pre, bn, bw, align, split, stores, warps, xdt in (configs if cc == 90 else configs[:2]):
        consts = {"A8": a8, "FUSE": fuse, "FUSE_CHUNKS": 12 if fuse else 1, "GROUP_W": gw, "PREFETCH": pre,
                  "BLOCK_N": bn, "BLOCK_W": bw, "W_ALIGN": align, "SPLIT_K": split, "SPLIT_STORES": stores}
        ptx = lowered_ptx("int4_gemv", consts, xdt, cc, warps, 1, ws_dtype="*bf16", aligned=True)
        assert "mma" not in ptx, consts
        assert ("ld.global.v4.b32" in ptx) == (align == 4), (consts, "16-byte weight loads expected exactly at W_ALIGN 4")
    for a8, fuse, gw in ((True, True, 8), (False, False, 0)):   # int4_moe's decode kernel on the same tile
        consts = {"A8": a8, "HAS_BIAS": True, "GROUP_W": gw, "FUSE": fuse, "FUSE_CHUNKS": 12 if fuse else 1,
                  "BLOCK_N": 64, "BLOCK_W": 32, "W_ALIGN": 4, "SPLIT_K": 4}
        ptx = lowered_ptx("int4_moe_gemv", consts, "*bf16", cc, 4, 1, ws_dtype="*bf16",
                          ptrs={"b_ptr": "*bf16", "e_ptr": "*i64"}, aligned=True)
        assert "mma" not in ptx and "ld.global.v4.b32" in ptx, consts


@pytest.mark.parametrize("cc", [80, 90])
def test_codes_kernels_compile_for_gpus_without_a_gpu(cc):
    """The large-M path lowered for sm_80 / sm_90: the codes GEMM is an int8 tensor-core MMA for
    A8 (wgmma on sm_90: both operands come from memory, which is its point), fp16 for A16; the
    one-launch prologue (x_q + codes, or x_q * s_x + q * scale) compiles."""
    gemm = [  # (A8, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, x)
        (True, 0, 128, 128, 128, 8, 3, "*i8"), (False, 64, 64, 64, 64, 4, 4, "*fp16")]
    for a8, group, bm, bn, bk, warps, stages, xdt in (gemm if cc == 90 else gemm[:1]):
        consts = {"A8": a8, "GROUP": group, "EVEN_K": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        ptx = lowered_ptx("int4_codes_gemm", consts, xdt, cc, warps, stages)
        assert (".s8.s8" in ptx) == a8, consts
        assert ("wgmma" in ptx) == (cc == 90), consts
    for scaled, qdt in ((False, "*i8"), (True, "*fp16")):
        consts = {"BLOCK_K": 4096, "ONE_PASS": True, "GROUP": 0 if not scaled else 64, "SCALED": scaled,
                  "BLOCK_N": 32, "BLOCK_W": 64}
        lowered_ptx("int4_prologue", consts, "*fp16", cc, 4, 1, ptrs={"xq_ptr": qdt, "q_ptr": qdt})


@pytest.mark.parametrize("cc", [80, 90])
def test_moe_kernel_compiles_for_gpus_without_a_gpu(cc):
    """int4_moe's kernel lowered for sm_80 / sm_90: an int8 tensor-core MMA for A8 (also quantizing
    bf16 x itself), both row blocks, the rows' experts read on the GPU (decode: an early exit);
    reading codes (plain tiles from memory), the 128 x 128 tiles take Hopper's wgmma."""
    for a8, group, bm, xdt, codes, fuse, routed in (
            (True, 64, 16, "*i8", False, False, False), (True, 0, 64, "*i8", False, False, False),
            (True, 64, 16, "*bf16", False, True, False), (False, 32, 16, "*bf16", False, False, False),
            (True, 64, 16, "*bf16", False, True, True), (False, 64, 16, "*bf16", False, False, True),
            (True, 64, 128, "*i8", True, False, False), (False, 0, 128, "*bf16", True, False, False)):
        consts = {"A8": a8, "HAS_BIAS": True, "GROUP": group, "CHUNK": group or 64, "CODES": codes, "FUSE": fuse,
                  "FUSE_CHUNKS": 12 if fuse else 1, "ROW_EXPERTS": routed, "BLOCK_M": bm, "BLOCK_N": 128}
        ptx = lowered_ptx("int4_moe", consts, xdt, cc, 8 if codes else 4, 3 if codes else 2, ws_dtype="*bf16",
                          ptrs={"b_ptr": "*bf16", "y_ptr": "*bf16", "blk_ptr": "*i64" if routed else "*i32",
                                "q_ptr": "*i8" if a8 else xdt})
        assert (".s8.s8" in ptx) == a8, consts
        if codes:
            assert ("wgmma" in ptx) == (cc == 90), consts


def test_eager_decode_calls_fuse_the_activation_quantization():
    """Eager A8 calls at M <= 32 take one launch (quantization inside the GEMM), graph captures
    and everything else keep their configs; the plan really runs the fused kernel."""
    pick = c.int4_gemm_config
    assert pick(16, 5760, 2880, act="a8", eager=True).fuse_act_quant
    assert not pick(16, 5760, 2880, act="a8", eager=False).fuse_act_quant
    assert not pick(16, 5760, 2880, act="a16", eager=True).fuse_act_quant
    assert pick(32, 5760, 2880, act="a8", eager=True).fuse_act_quant
    for m in (33, 64, 65, 1024):
        assert pick(m, 5760, 2880, act="a8", eager=True) == pick(m, 5760, 2880, act="a8"), m
    for per_channel in (False, True):
        plan = c.int4_plan(16, 5760, 2880, 1 if per_channel else 45, "a8", torch.float16, torch.device("cpu"),
                            None, eager=True)
        assert plan.kernel == "int4_gemm_grouped" and plan.gemm_consts["FUSE"] and plan.mode == 2, plan
        assert plan.gemm_consts["FUSE_CHUNKS"] == 12   # 2880 inputs in unrolled loads of 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 32])
def test_cuda_graph_captured_after_eager_calls(m):
    """The usual order, eager calls then a CUDA-graph capture: eager A8 calls at M <= 32 take the
    fused one-launch plan, the capture the two-launch one, planned inside the capture; both give
    the float64 result (the replay on new activations too)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(3)
    q, ws = c.random_int4_weights(5760, 2880, 64, gen, dev)
    wp = c.pack_int4(q)
    x = torch.randn(m, 2880, generator=gen, device=dev).half()
    assert c.relative_error(c.int4_linear(x, wp, ws, act="a8"), c.int4_linear_reference(x, wp, ws, act="a8")) <= TOL
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = c.int4_linear(x, wp, ws, act="a8")
    x.copy_(torch.randn(m, 2880, generator=gen, device=dev))
    graph.replay()
    torch.cuda.synchronize()
    assert c.relative_error(y, c.int4_linear_reference(x, wp, ws, act="a8")) <= TOL
    fused = {key[-1]: plan.gemm_consts.get("FUSE") for key, plan in c.INT4_PLANS.items()
             if key[:5] == (m, 5760, 2880, 45, "a8") and key[7] is None}
    assert fused == {True: True, False: False}, fused


def test_default_configs_sum_split_k_in_a_fixed_order():
    """Every default config that splits K stores the shares in slices (summed in split order), so
    its output bits do not depend on which program finishes first; the plans pass that on."""
    split = 0
    for m in (1, 2, 16, 17, 32, 64, 65, 256, 1024):
        for n, k in ((4096, 2880), (512, 2880), (2880, 4096), (5760, 2880), (2880, 2880)):
            for per_channel in (False, True):
                for act in ("a8", "a16"):
                    for bf16 in (False, True):
                        for eager in (False, True):
                            cfg = c.int4_gemm_config(m, n, k, per_channel=per_channel, act=act, bf16=bf16, eager=eager)
                            assert cfg.split_k == 1 or cfg.split_stores, (m, n, k, cfg.label())
                            split += cfg.split_k > 1
    assert split > 100, split   # the rule still splits: the check above is not vacuous
    plan = c.int4_plan(16, 5760, 2880, 45, "a8", torch.float16, torch.device("cpu"), None)
    assert plan.gemm_consts["SPLIT_K"] > 1 and plan.gemm_consts["SPLIT_STORES"], plan.gemm_consts


def plan_ptx(plan, x_dtype: str = "*i8", **consts) -> str:
    """sm_90 PTX of a plan's GEMM with its constexprs (launch options left out), consts overriding."""
    launch = ("num_warps", "num_stages", "enable_fp_fusion", "launch_pdl")
    return lowered_ptx(plan.kernel, {**{k: v for k, v in plan.gemm_consts.items() if k not in launch}, **consts},
                       x_dtype, 90, plan.cfg.num_warps, plan.cfg.num_stages, aligned=True)


def test_default_kernels_add_no_floats_atomically():
    """The PTX of the decode kernels as their default plans launch them (M = 1 GEMV, M = 16 grouped
    GEMM on 64- and 32-wide tiles, eager and in a graph, int4_moe's decode GEMV with a split) has
    no float atomic add: the order of a float sum would then depend on which program came first.
    The same M = 16 plan with split_stores=False has one, so the pattern finds what it looks for."""
    float_atomic = re.compile(r"\b(?:atom|red)\.[a-z0-9.]*add\.f32")
    ptxs = {}
    for m, n, eager in ((1, 5760, False), (16, 5760, False), (16, 512, False), (16, 512, True)):
        plan = c.int4_plan(m, n, 2880, 45, "a8", torch.float16, torch.device("cpu"), None, eager)
        assert plan.cfg.split_k > 1, plan.cfg.label()
        xdt = "*fp16" if plan.gemm_consts.get("FUSE") else "*i8"
        ptxs[plan.cfg.label()] = plan_ptx(plan, xdt)
        if (m, n) == (16, 5760):
            atomics = plan_ptx(plan, xdt, SPLIT_STORES=False)
            assert float_atomic.search(atomics), "fp32 atomics expected with split_stores=False"
    consts = {"A8": True, "HAS_BIAS": True, "GROUP_W": 8, "FUSE": False, "FUSE_CHUNKS": 1, "BLOCK_N": 64,
              "BLOCK_W": 32, "W_ALIGN": 4, "SPLIT_K": 4}
    ptxs["int4_moe_gemv"] = lowered_ptx("int4_moe_gemv", consts, "*i8", 90, 4, 1, ws_dtype="*bf16",
                                        ptrs={"b_ptr": "*bf16", "e_ptr": "*i64", "y_ptr": "*bf16"}, aligned=True)
    for kernel, ptx in ptxs.items():
        assert not float_atomic.search(ptx), (kernel, float_atomic.search(ptx).group(0))


def test_pdl_kernels_load_weights_before_the_wait_and_store_after_it(monkeypatch):
    """Programmatic dependent launch (sm_90+): the GEMM may start while the kernel before it (A8:
    int8_rows_kernel, which lets it, griddepcontrol.launch_dependents) still runs. Its PTX must
    wait (griddepcontrol.wait) before its first store, and after loading its first weights where
    the config prefetches (M <= 16). Without PDL (the plans on a CPU device, the interpreter) no
    griddepcontrol at all."""
    for m, n, groups in ((1, 5760, 45), (1, 512, 1), (16, 5760, 45), (16, 512, 1), (64, 2880, 45)):
        plan = c.int4_plan(m, n, 2880, groups, "a8", torch.float16, torch.device("cpu"), None)
        assert "PDL" not in plan.gemm_consts and not plan.quant_consts["PDL"], plan.cfg.label()
        assert "griddepcontrol" not in plan_ptx(plan)
        ptx = plan_ptx(plan, PDL=True)
        body = ptx[ptx.index(".entry"):]
        assert body.count("griddepcontrol.wait") == 1, plan.cfg.label()
        before, after = body.split("griddepcontrol.wait")
        assert "st.global" not in before and "st.global" in after, plan.cfg.label()
        assert ("ld.global" in before) == plan.cfg.prefetch, plan.cfg.label()   # M > 32 loads nothing early
    # where PDL is supported, every default plan takes it but those with the quantization fused in
    # (eager calls: PDL made them slower on an H200); the cache entry stands for an sm_90 GPU's answer
    monkeypatch.setitem(c.PDL_SUPPORTED, "cpu", True)
    for m, n, eager in ((1, 5760, False), (1, 5760, True), (16, 512, False), (16, 512, True), (64, 2880, False)):
        plan = c.int4_plan(m, n, 2880, 45, "a8", torch.float16, torch.device("cpu"), None, eager)
        fused = plan.gemm_consts["FUSE"]
        assert fused == eager and bool(plan.gemm_consts.get("launch_pdl")) != fused, plan.cfg.label()
        assert plan.quant_consts["PDL"] != fused and plan.gemm_consts.get("PDL", False) != fused, plan.cfg.label()
    rows = lowered_ptx("int8_rows", dict(BLOCK_K=4096, ONE_PASS=True, PERM_KW=1, PDL=True), "*fp16", 90, 4, 1,
                       ptrs={"xq_ptr": "*i8"}, aligned=True)
    assert "griddepcontrol.launch_dependents" in rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 64])
def test_default_plans_give_the_same_bits_every_call(m):
    """The default plans split K at M <= 64 (GEMV, grouped); their shares are summed in split order,
    so repeated calls, eager or replayed from a CUDA graph, give identical bits (fp32 atomics did
    not: two eager decodes of one prompt differed by 5.6e-3 and picked other tokens on an H200)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(m)
    for groups, act in ((45, "a8"), (1, "a8"), (45, "a16")):
        q, ws = c.random_int4_weights(4096, 2880, 2880 // groups, gen, dev)
        wp = c.pack_int4(q)
        x = torch.randn(m, 2880, generator=gen, device=dev).half()
        plan_split = c.int4_gemm_config(m, 4096, 2880, per_channel=groups == 1, act=act).split_k
        eager = [c.int4_linear(x, wp, ws, act=act) for _ in range(8)]
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            c.int4_linear(x, wp, ws, act=act)   # plans and compiles outside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            y = c.int4_linear(x, wp, ws, act=act)
        replays = []
        for _ in range(8):
            graph.replay()
            replays.append(y.clone())
        torch.cuda.synchronize()
        assert plan_split > 1, (m, groups, act)   # the case under test: K split across programs
        assert all(torch.equal(e, eager[0]) for e in eager), (m, groups, act, "eager")
        assert all(torch.equal(r, replays[0]) for r in replays), (m, groups, act, "graph")
        assert c.relative_error(eager[0], c.int4_linear_reference(x, wp, ws, act=act)) <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pdl_gives_the_same_bits_as_plain_launches():
    """On sm_90+ the default M <= 64 plans launch with programmatic dependent launch. Each graph
    replay first writes new activations into x (a copy kernel), then runs int4_linear: a GEMM that
    read x or x_q before its wait would see the last replay's values. Every replay must equal the
    same config launched plainly, bit for bit, and the float64 reference."""
    from dataclasses import replace
    dev = torch.device("cuda")
    if not c.pdl_supported(dev):
        pytest.skip("no programmatic dependent launch here (needs compute capability 9.0+, CUDA 12.3+)")
    gen = torch.Generator(device=dev).manual_seed(7)
    for m, groups, act in ((1, 45, "a8"), (16, 45, "a8"), (16, 1, "a8"), (16, 45, "a16"), (64, 45, "a8")):
        q, ws = c.random_int4_weights(4096, 2880, 2880 // groups, gen, dev)
        wp = c.pack_int4(q)
        cfg = c.int4_gemm_config(m, 4096, 2880, c.sm_count(dev), per_channel=groups == 1, act=act)
        plan = c.int4_plan(m, 4096, 2880, groups, act, torch.float16, dev, cfg)
        assert plan.gemm_consts.get("launch_pdl") and plan.quant_consts["PDL"], cfg.label()
        srcs = [torch.randn(m, 2880, generator=gen, device=dev).half() for _ in range(6)]
        src_buf, x = srcs[0].clone(), torch.empty_like(srcs[0])
        c.int4_linear(src_buf, wp, ws, act=act, config=cfg)   # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.copy_(src_buf)
            y = c.int4_linear(x, wp, ws, act=act, config=cfg)
        for src in srcs:
            src_buf.copy_(src)
            graph.replay()
            plain = c.int4_linear(src, wp, ws, act=act, config=replace(cfg, pdl=False))
            torch.cuda.synchronize()
            assert torch.equal(y, plain), (m, groups, act)
            assert c.relative_error(y, c.int4_linear_reference(src, wp, ws, act=act)) <= TOL
            x_eager = src.clone()
            assert torch.equal(c.int4_linear(x_eager, wp, ws, act=act, config=cfg), plain), (m, groups, act, "eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_runtime_reports_the_builtin_backend_on_the_gpu():
    """verify-runtime --json --require-w4a8 on a GPU: the built-in backend runs, its self-test
    passes, and the detail says whether the kernels use programmatic dependent launch (sm_90+)."""
    from conftest import run_cli
    r = run_cli("verify-runtime", "--json", "--require-w4a8")
    assert r.returncode == 0, r.stdout + r.stderr
    env = json.loads(r.stdout)
    builtin = env["backends"]["builtin_triton"]
    assert builtin["runnable"] and env["builtin_selftest"]["ok"], builtin
    hopper = torch.cuda.get_device_capability()[0] >= 9 and c.pdl_supported(torch.device("cuda"))
    assert ("programmatic dependent launch" in builtin["detail"]) == hopper, builtin["detail"]


def test_float64_reference_is_the_dequantized_matmul():
    wp, ws = random_int4_layer(5, 64, 32)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(15)).to(torch.float16)
    w = c.unpack_int4_packed(wp, 64).double() * ws.double().repeat_interleave(32, 1)
    assert torch.allclose(c.int4_linear_reference(x, wp, ws, "a16"), x.double() @ w.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gemv_rows", [c.MOE_GEMV_ROWS, 0], ids=["gemv", "tensor_cores"])
def test_moe_decode_routing_stays_on_the_gpu(gemv_rows, monkeypatch):
    """A decode step's MoE (routed_experts_forward: sort, both int4_moe calls, the weighted sum)
    never waits on the GPU (torch's sync debug mode raises on any host sync), so it can be captured
    in a CUDA graph once and replayed with another token routed to other experts; each step
    against the float64 reference of the same quantized math, expert by expert. Both decode
    kernels: the GEMV (the default at one token) and the tensor-core one."""
    import types
    monkeypatch.setattr(c, "MOE_GEMV_ROWS", gemv_rows)
    dev, k, n, experts, top = torch.device("cuda"), 2880, 256, 32, 4
    gate_up = [t.cuda() for t in random_moe_layers(experts, 2 * n, k, 64, dtype=torch.bfloat16, seed=60)]
    down = [t.cuda() for t in random_moe_layers(experts, k, n, 64, dtype=torch.bfloat16, seed=61)]
    block = types.SimpleNamespace(
        num_experts=experts, int4_act="a8", gate_up_weight_packed=gate_up[0], gate_up_weight_scale=gate_up[1],
        gate_up_bias=None, down_weight_packed=down[0], down_weight_scale=down[1], down_bias=None,
        _apply_gate=lambda g: torch.nn.functional.silu(g[:, :n]) * g[:, n:])   # a GLU, as gpt-oss's
    gen = torch.Generator(device=dev).manual_seed(62)

    def routing():
        return (torch.rand(1, experts, generator=gen, device=dev).topk(top, -1).indices,
                torch.rand(1, top, generator=gen, device=dev).to(torch.bfloat16))

    def reference(h, idx, wts):
        out = 0
        for j, e in enumerate(idx[0].tolist()):
            one = [int(i == e) for i in range(experts)]
            g = c.int4_moe_reference(h, one, *gate_up, act="a8")[(0, 1)].to(torch.bfloat16).to(dev)
            out = out + wts[0, j].double().cpu() * c.int4_moe_reference(block._apply_gate(g), one, *down, act="a8")[(0, 1)]
        return out

    h, (idx, wts) = torch.randn(1, k, generator=gen, device=dev).to(torch.bfloat16), routing()
    c.routed_experts_forward(block, h, idx, wts)   # compiled outside the sync check and the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = c.routed_experts_forward(block, h, idx, wts)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    err = c.relative_error(y, reference(h, idx, wts))   # bf16 roundings: gate_up's y, the sum of 4 experts
    assert err <= 1e-2, err   # (the 4 weights paired with the wrong experts: 0.17 in the interpreter)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = c.routed_experts_forward(block, h, idx, wts)
    for step in range(3):   # new token, new experts, the same buffers
        h.copy_(torch.randn(1, k, generator=gen, device=dev))
        new_idx, new_wts = routing()
        idx.copy_(new_idx)
        wts.copy_(new_wts)
        graph.replay()
        torch.cuda.synchronize()
        err = c.relative_error(y_graph, reference(h, idx, wts))
        assert err <= 1e-2, (step, err)


if __name__ == "__main__":  # the interpreter child: python tests/test_kernels.py CASE...
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases(sys.argv[1:] or list(CASES))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moe_kernel_on_the_gpu(dtype):
    """int4_moe compiled for the GPU at GPT-OSS's K = 2880, A8 and A16 (bf16 A16 is a bf16 dot,
    which the interpreter computes wrongly), in registers and on codes, against float64 per
    expert; output rounding allows ~2e-4 (fp16) / ~1.7e-3 (bf16)."""
    tol = 1e-3 if dtype == torch.float16 else 2.5e-3
    k, n, counts = 2880, 192, [40, 0, 3, 190, 1]   # 190 rows: the 128-row tiles
    for group in (64, None):
        wp, ws = (t.cuda() for t in random_moe_layers(len(counts), n, k, group, dtype=dtype, seed=20))
        bias = torch.randn(len(counts), n, generator=torch.Generator().manual_seed(21)).to(dtype).cuda()
        x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(22)).to(dtype).cuda()
        for act, codes, fuse in (("a8", False, False), ("a8", False, True), ("a8", True, None), ("a16", False, None),
                                 ("a16", True, None)):
            y = c.int4_moe(x, counts, wp, ws, bias, act=act, codes=codes, fuse=fuse)
            for (lo, hi), ref in c.int4_moe_reference(x, counts, wp, ws, bias, act=act).items():
                err = c.relative_error(y[lo:hi], ref)
                assert err <= tol, (dtype, group, act, codes, fuse, lo, err)
            # fused (x quantized in the kernel, its absmax over 12 row chunks at K = 2880) is not bit for bit
            # the unfused y on the GPU (it is under the interpreter): it compiles without FMA contraction, for
            # the exact rounding of x_q, so its fp32 rescale rounds twice where the other's rounds once


def compiled_variants(kernel) -> int:
    """Kernels Triton holds in memory for this JIT function (every device), across its versions."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(v) for v in kernel.cache.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_decode_steps_compile_one_kernel():
    """Decode routes each token to different experts: the first routed expert (e0) and the row-block
    table's offset change from step to step and must not pick a new compiled variant (Triton
    specializes integers == 1 or % 16 == 0), or generation stalls on a compile at random steps."""
    k, n, experts = 2880, 128, 20
    wp, ws = (t.cuda() for t in random_moe_layers(experts, n, k, 64, dtype=torch.bfloat16, seed=40))
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(41)).to(torch.bfloat16).cuda()
    kern = c.triton_kernels()["int4_moe"]
    seen = []
    for first, second in ((0, 3), (1, 2), (5, 9), (16, 19), (7, 16)):   # e0 = 0, 1, 5, 16, 7
        counts = [0] * experts
        counts[first] = counts[second] = 1
        y = c.int4_moe(x, counts, wp, ws, act="a8")
        for (lo, hi), ref in c.int4_moe_reference(x, counts, wp, ws, act="a8").items():
            assert c.relative_error(y[lo:hi], ref) <= 2.5e-3
        seen.append(compiled_variants(kern))
    assert seen[1:] == seen[:1] * 4, f"int4_moe compiled {seen[-1] - seen[0]} more variants across decode steps"
