"""Run 63: why int4_moe fused (x quantized in the kernel) != unfused bit for bit in the GPU test:
compare per tile, and against the unfused kernel compiled without FMA contraction."""
import sys
import torch
sys.path.insert(0, "."); sys.path.insert(0, "tests")
import compress_gptoss as c
from test_kernels import random_int4_layer

kern = c._triton_kernels()
orig = kern["int4_moe"]


class NoFMA:
    def __getitem__(self, grid):
        def launch(*a, **kw):
            kw.setdefault("enable_fp_fusion", False)
            return orig[grid](*a, **kw)
        return launch


k, n, counts = 2880, 192, [40, 0, 3, 190, 1]
for dtype in (torch.float16, torch.bfloat16):
    for group in (64, None):
        layers = [random_int4_layer(n, k, group, dtype=dtype, seed=20 + e) for e in range(len(counts))]
        wp = torch.stack([w for w, _ in layers]).cuda()
        ws = torch.stack([s for _, s in layers]).cuda()
        bias = torch.randn(len(counts), n, generator=torch.Generator().manual_seed(21)).to(dtype).cuda()
        x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(22)).to(dtype).cuda()
        for tiles in (None, (16, 64, 4, None), (128, 64, 4, None)):
            yf = c.int4_moe(x, counts, wp, ws, bias, "a8", tiles, False, fuse=True)
            yu = c.int4_moe(x, counts, wp, ws, bias, "a8", tiles, False, fuse=False)
            kern["int4_moe"] = NoFMA()
            yn = c.int4_moe(x, counts, wp, ws, bias, "a8", tiles, False, fuse=False)
            kern["int4_moe"] = orig
            print(dtype, group, tiles, "fused == unfused:", torch.equal(yf, yu), int((yf != yu).sum()), "of", yf.numel(),
                  "| fused == unfused without FMA:", torch.equal(yf, yn), int((yf != yn).sum()), flush=True)
