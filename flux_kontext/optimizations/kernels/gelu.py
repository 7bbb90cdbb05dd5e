"""GELU + FP8: [attention output | GELU(MLP)] quantized rowwise to e4m3 in one pass over each row, the input of
proj_out / ff.net[2]; the Triton kernel next to its PyTorch reference."""

from __future__ import annotations

import math

import torch

from flux_kontext.optimizations.gelu_sigmoid_form import tanh_gelu
from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_rowwise_fp8

# The GELU kernel's warps per row, the fastest of bench/fused_blocks.py's sweep of 4-32 per row width (BENCHMARKS.md,
# "Fused FP8 blocks"): the single blocks' 15,360-wide rows take 32, the feed-forwards' 12,288-wide rows 8.
GELU_NUM_WARPS = {True: 32, False: 8}  # keyed by "has the attention part"
# Which rows the kernel reading rows in two pieces serves (triton_rows.py), keyed the same way: on H200
# (bench/kernels_rows.py, BENCHMARKS.md #18) the feed-forwards' 4,096 x 12,288 took 102 µs per launch against 133
# on the padded kernel; the single blocks' [attention | MLP] rows 160-166 against 157, so they keep the padded one.
GELU_SPLIT = {True: False, False: True}
# The sigmoid form's exponent in base 2: sigmoid(2z) = 1 / (1 + 2^t), t = -2·sqrt(2/pi)·log2(e)·(x + 0.044715·x³).
GELU_A = -2.0 * math.sqrt(2.0 / math.pi) * math.log2(math.e)
GELU_B = GELU_A * 0.044715


def reference_gelu_fp8(attn: torch.Tensor | None, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[attn | GELU(mlp)] quantized rowwise to e4m3: (values (..., A+F), scales (..., 1) fp32)."""
    gelu = tanh_gelu(mlp)  # sigmoid form, rounded to mlp's dtype like the unfused path stores it
    return quantize_rowwise_fp8(gelu if attn is None else torch.cat([attn, gelu], dim=-1))


def pieces(width: int) -> tuple[int, int]:
    """A row of ``width`` read as two power-of-two pieces: the largest power of two within it, then the rest rounded
    up to a power of two (0 when nothing is left): 12,288 -> (8,192, 4,096), 3,072 -> (2,048, 1,024)."""
    first = 1 << (width.bit_length() - 1)
    rest = width - first
    return first, (1 << (rest - 1).bit_length()) if rest else 0


def build(launch) -> dict:
    """The Triton kernels' launcher and the ``flux_kontext::gelu_fp8_rowwise`` op (registered: call once per process,
    through kernels.ops()); ``launch(kernel, raw)`` is how launchers call a kernel."""
    import triton
    from torch.library import triton_op

    from flux_kontext.optimizations.kernels.triton_rows import gelu_fp8_kernel, gelu_fp8_padded_kernel

    def launch_gelu_fp8(attn, mlp, has_attn: bool, num_warps=None, raw: bool = False, fast=True, split=None):
        """``split``: the kernel reading rows in two pieces (None: GELU_SPLIT's choice); ``fast``: its approximate
        exp2 / reciprocal (False: Triton's exp2 and division; for comparisons)."""
        n_mlp = mlp.shape[-1]
        n_attn = attn.shape[-1] if has_attn else 0
        rows = mlp.numel() // n_mlp
        mlp2 = mlp.reshape(rows, n_mlp)
        attn2 = attn.reshape(rows, attn.shape[-1]) if has_attn else mlp2
        out = torch.empty((rows, n_attn + n_mlp), dtype=FP8, device=mlp.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=mlp.device)
        args = (attn2, mlp2, out, scale, n_attn, n_mlp, attn2.stride(0), mlp2.stride(0), out.stride(0))
        warps = num_warps or GELU_NUM_WARPS[has_attn]
        if not (GELU_SPLIT[has_attn] if split is None else split):
            blocks = dict(BLOCK_ATTN=triton.next_power_of_2(max(n_attn, 16)), BLOCK_MLP=triton.next_power_of_2(n_mlp))
            launch(gelu_fp8_padded_kernel, raw)[(rows,)](*args, HAS_ATTN=has_attn, **blocks, num_warps=warps)
            return out, scale
        (attn_1, attn_2), (mlp_1, mlp_2) = pieces(max(n_attn, 16)), pieces(n_mlp)
        launch(gelu_fp8_kernel, raw)[(rows,)](
            *args,
            HAS_ATTN=has_attn,
            ATTN_1=attn_1,
            ATTN_2=attn_2,
            MLP_1=mlp_1,
            MLP_2=mlp_2,
            FAST=fast,
            num_warps=warps,
        )
        return out, scale

    @triton_op("flux_kontext::gelu_fp8_rowwise", mutates_args={})
    def gelu_fp8(attn: torch.Tensor, mlp: torch.Tensor, has_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_gelu_fp8(attn, mlp, has_attn)

    return {"gelu_fp8": gelu_fp8, "launch_gelu_fp8": launch_gelu_fp8}
