"""GELU + FP8: [attention output | GELU(MLP)] quantized rowwise to e4m3 in one pass over each row, the input of
proj_out / ff.net[2]; the Triton kernel next to its PyTorch reference."""

from __future__ import annotations

import torch

from flux_kontext.optimizations.gelu_sigmoid_form import tanh_gelu
from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_rowwise_fp8

# The GELU kernel's warps per row, the fastest of bench/fused_blocks.py's sweep of 4-32 per row width (BENCHMARKS.md,
# "Fused FP8 blocks"): the single blocks' 15,360-wide rows take 32, the feed-forwards' 12,288-wide rows 8.
GELU_NUM_WARPS = {True: 32, False: 8}  # keyed by "has the attention part"


def reference_gelu_fp8(attn: torch.Tensor | None, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[attn | GELU(mlp)] quantized rowwise to e4m3: (values (..., A+F), scales (..., 1) fp32)."""
    gelu = tanh_gelu(mlp)  # sigmoid form, rounded to mlp's dtype like the unfused path stores it
    return quantize_rowwise_fp8(gelu if attn is None else torch.cat([attn, gelu], dim=-1))


def build(launch) -> dict:
    """The Triton kernel, its launcher and the ``flux_kontext::gelu_fp8_rowwise`` op (registered: call once per
    process, through kernels.ops()); ``launch(kernel, raw)`` is how launchers call a kernel."""
    import triton
    import triton.language as tl
    from torch.library import triton_op

    @triton.jit
    def gelu_fp8_kernel(
        attn_ptr,
        mlp_ptr,
        out_ptr,
        scale_ptr,
        n_attn,
        n_mlp,
        attn_stride,
        mlp_stride,
        out_stride,
        HAS_ATTN: tl.constexpr,
        BLOCK_ATTN: tl.constexpr,
        BLOCK_MLP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols_m = tl.arange(0, BLOCK_MLP)
        mask_m = cols_m < n_mlp
        m = tl.load(mlp_ptr + row * mlp_stride + cols_m, mask=mask_m, other=0.0).to(tl.float32)
        g = m * tl.sigmoid(2.0 * 0.7978845608028654 * (m + 0.044715 * m * m * m))
        g = g.to(tl.bfloat16).to(tl.float32)
        amax = tl.max(tl.abs(g), axis=0)
        if HAS_ATTN:
            cols_a = tl.arange(0, BLOCK_ATTN)
            mask_a = cols_a < n_attn
            a = tl.load(attn_ptr + row * attn_stride + cols_a, mask=mask_a, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=0))
        scale = tl.maximum(amax, 1e-12) / 448.0
        if HAS_ATTN:
            qa = tl.clamp(a / scale, -448.0, 448.0)
            tl.store(out_ptr + row * out_stride + cols_a, qa.to(tl.float8e4nv), mask=mask_a)
        qg = tl.clamp(g / scale, -448.0, 448.0)
        offset = n_attn if HAS_ATTN else 0
        tl.store(out_ptr + row * out_stride + offset + cols_m, qg.to(tl.float8e4nv), mask=mask_m)
        tl.store(scale_ptr + row, scale)

    def launch_gelu_fp8(attn, mlp, has_attn: bool, num_warps: int | None = None, raw: bool = False):
        n_mlp = mlp.shape[-1]
        n_attn = attn.shape[-1] if has_attn else 0
        rows = mlp.numel() // n_mlp
        mlp2 = mlp.reshape(rows, n_mlp)
        attn2 = attn.reshape(rows, attn.shape[-1]) if has_attn else mlp2
        out = torch.empty((rows, n_attn + n_mlp), dtype=FP8, device=mlp.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=mlp.device)
        launch(gelu_fp8_kernel, raw)[(rows,)](
            attn2,
            mlp2,
            out,
            scale,
            n_attn,
            n_mlp,
            attn2.stride(0),
            mlp2.stride(0),
            out.stride(0),
            HAS_ATTN=has_attn,
            BLOCK_ATTN=triton.next_power_of_2(max(n_attn, 16)),
            BLOCK_MLP=triton.next_power_of_2(n_mlp),
            num_warps=num_warps or GELU_NUM_WARPS[has_attn],
        )
        return out, scale

    @triton_op("flux_kontext::gelu_fp8_rowwise", mutates_args={})
    def gelu_fp8(attn: torch.Tensor, mlp: torch.Tensor, has_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_gelu_fp8(attn, mlp, has_attn)

    return {"gelu_fp8": gelu_fp8, "launch_gelu_fp8": launch_gelu_fp8}
