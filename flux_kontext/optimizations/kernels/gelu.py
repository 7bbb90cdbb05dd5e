"""GELU + FP8: [attention output | GELU(MLP)] quantized rowwise to e4m3 in one pass over each row, the input of
proj_out / ff.net[2]; the Triton kernel next to its PyTorch reference."""

from __future__ import annotations

import math

import torch

from flux_kontext.optimizations.gelu_sigmoid_form import tanh_gelu
from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_rowwise_fp8

# Which kernel serves which rows, keyed by "has the attention part" (the single blocks' [attention | MLP] rows of
# 3,072 + 12,288; the feed-forwards' 12,288): "two_pass" (triton_rows.gelu_fp8_kernel_two_pass: tiles, the row read
# twice, many rows per SM), "split" (the row in registers in two power-of-two pieces), "padded" (the row in registers
# padded to powers of two). bench/kernels_rows.py on H200 (BENCHMARKS.md #18, in-graph µs per launch): single blocks'
# 4,608 rows 100.8 on the padded kernel, 79.1 split (8 warps), 72.6 two-pass (2,048-wide tiles, 8 warps); the
# feed-forwards' 4,096 rows 49.0 split, 54.9 two-pass, so they keep the split kernel.
GELU_KERNEL = {True: "two_pass", False: "split"}
# Warps per row of the row-in-registers kernels, keyed the same way: the feed-forwards' 12,288-wide rows 8 (split:
# 49.0 µs at 8, 53.1 at 16, 65.7 at 32, the run above), the single blocks' 32 (the padded kernel's best).
GELU_NUM_WARPS = {True: 32, False: 8}
# The two-pass kernel's (tile width, warps), keyed the same way: single blocks 72.6 µs at (2,048, 8) against 76.2 at
# (2,048, 4), 76.3 at (4,096, 8), 81.9 at (4,096, 16), 82.9 at (1,024, 4).
GELU_TWO_PASS = {True: (2048, 8), False: (2048, 8)}
# |GELU(x)| <= 0.170 for x < 0 (its minimum, at x ~ -0.75): a row whose absmax is above this bound has it on the
# positive side, where GELU (rounded to bf16) is non-decreasing: GELU of the row's largest input.
GELU_NEGATIVE_SIDE_BOUND = 0.25
# The sigmoid form's exponent in base 2: sigmoid(2z) = 1 / (1 + 2^t), t = -2·sqrt(2/pi)·log2(e)·(x + 0.044715·x³).
GELU_A = -2.0 * math.sqrt(2.0 / math.pi) * math.log2(math.e)
GELU_B = GELU_A * 0.044715


def reference_gelu_fp8(
    attn: torch.Tensor | None, mlp: torch.Tensor, extra: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """[attn | GELU(mlp)] quantized rowwise to e4m3: (values (..., A+F), scales (..., 1) fp32); with ``extra``, values
    has that many more columns after them for the caller to write (LoRA's x_aug: lora_k_augment.py), here zeros."""
    gelu = tanh_gelu(mlp)  # sigmoid form, rounded to mlp's dtype like the unfused path stores it
    values, scales = quantize_rowwise_fp8(gelu if attn is None else torch.cat([attn, gelu], dim=-1))
    if extra:
        values = torch.cat([values, values.new_zeros(*values.shape[:-1], extra)], dim=-1)
    return values, scales


def pieces(width: int) -> tuple[int, int]:
    """A row of ``width`` read as two power-of-two pieces: the largest power of two within it, then the rest rounded
    up to a power of two (0 when nothing is left): 12,288 -> (8,192, 4,096), 3,072 -> (2,048, 1,024)."""
    first = 1 << (width.bit_length() - 1)
    rest = width - first
    return first, (1 << (rest - 1).bit_length()) if rest else 0


def tile(width: int, block: int) -> tuple[int, bool]:
    """The tile a row of ``width`` is read in, at most ``block`` (a power of two) wide: the largest power of two
    dividing both when that is at least 256 (no masked lane: 3,072 at 2,048 -> 1,024), else ``block`` masked at the
    row's end; (tile, whether the tiles cover the row exactly)."""
    common = math.gcd(width, block) if width else block
    return (common, True) if common >= min(256, block) else (block, False)


def build(launch) -> dict:
    """The Triton kernels' launcher and the ``flux_kontext::gelu_fp8_rowwise`` op (registered: call once per process,
    through kernels.ops()); ``launch(kernel, raw)`` is how launchers call a kernel."""
    import triton
    from torch.library import triton_op

    from flux_kontext.optimizations.kernels.triton_rows import (
        gelu_fp8_kernel,
        gelu_fp8_kernel_two_pass,
        gelu_fp8_padded_kernel,
    )

    def launch_gelu_fp8(
        attn, mlp, has_attn: bool, num_warps=None, raw=False, fast=True, variant=None, block=None, extra: int = 0
    ):
        """``variant``: "two_pass", "split" or "padded" (None: GELU_KERNEL's choice); ``fast``: approximate exp2 /
        reciprocal (two_pass and split; False: Triton's exp2 and division, for comparisons); ``block``: the two-pass
        kernel's tile width (None: GELU_TWO_PASS's); ``extra``: columns left unwritten after each row (the caller's)."""
        n_mlp = mlp.shape[-1]
        n_attn = attn.shape[-1] if has_attn else 0
        rows = mlp.numel() // n_mlp
        mlp2 = mlp.reshape(rows, n_mlp)
        attn2 = attn.reshape(rows, attn.shape[-1]) if has_attn else mlp2
        out = torch.empty((rows, n_attn + n_mlp + extra), dtype=FP8, device=mlp.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=mlp.device)
        args = (attn2, mlp2, out, scale, n_attn, n_mlp, attn2.stride(0), mlp2.stride(0), out.stride(0))
        variant = variant or GELU_KERNEL[has_attn]
        if variant == "two_pass":
            default_block, default_warps = GELU_TWO_PASS[has_attn]
            attn_block, even_attn = tile(n_attn, block or default_block)
            mlp_block, even_mlp = tile(n_mlp, block or default_block)
            launch(gelu_fp8_kernel_two_pass, raw)[(rows,)](
                *args,
                HAS_ATTN=has_attn,
                ATTN_BLOCK=attn_block,
                MLP_BLOCK=mlp_block,
                EVEN_ATTN=even_attn,
                EVEN_MLP=even_mlp,
                FAST=fast,
                num_warps=num_warps or default_warps,
            )
            return out, scale
        warps = num_warps or GELU_NUM_WARPS[has_attn]
        if variant == "padded":
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
    def gelu_fp8(
        attn: torch.Tensor, mlp: torch.Tensor, has_attn: bool, extra: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_gelu_fp8(attn, mlp, has_attn, extra=extra)

    return {"gelu_fp8": gelu_fp8, "launch_gelu_fp8": launch_gelu_fp8}
