"""Modulated LayerNorm + FP8: LayerNorm (no affine) + AdaLN modulation x·(1 + scale) + shift, quantized rowwise to
e4m3, the input of the QKV / MLP GEMMs; rows read from two tensors (text, image) when the block concatenates them, so
the concatenation is never written. The Triton kernel next to its PyTorch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_rowwise_fp8
from flux_kontext.optimizations.kernels.gelu import pieces


def reference_ln_mod_fp8(first, second, shift, scale, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(cat(first, second)) · (1 + scale) + shift, rounded to the input dtype, quantized rowwise:
    (values (rows, C), scales (rows, 1)); shift and scale are (batch, C)."""
    x = first if second is None else torch.cat([first, second], dim=1)
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)  # diffusers' AdaLayerNormZero: no affine
    modulated = normed * (1 + scale[:, None]) + shift[:, None]
    return quantize_rowwise_fp8(modulated.reshape(-1, x.shape[-1]))


def build(launch) -> dict:
    """The Triton kernel, its launcher and the ``flux_kontext::ln_mod_fp8_rowwise`` op (registered: call once per
    process, through kernels.ops()); ``launch(kernel, raw)`` is how launchers call a kernel."""
    from torch.library import triton_op

    from flux_kontext.optimizations.kernels.triton_rows import ln_mod_fp8_kernel

    def launch_ln_mod_fp8(first, second, shift, scale, has_second: bool, eps: float, raw=False, num_warps=4):
        batch, n_first, n_cols = first.shape
        seq = n_first + (second.shape[1] if has_second else 0)
        out = torch.empty((batch * seq, n_cols), dtype=FP8, device=first.device)
        out_scale = torch.empty((batch * seq, 1), dtype=torch.float32, device=first.device)
        block_1, block_2 = pieces(n_cols)
        launch(ln_mod_fp8_kernel, raw)[(batch * seq,)](
            first,
            second,
            shift,
            scale,
            out,
            out_scale,
            n_first,
            seq,
            n_cols,
            first.stride(0),
            first.stride(1),
            second.stride(0),
            second.stride(1),
            shift.stride(0),
            scale.stride(0),
            eps,
            BLOCK_1=block_1,
            BLOCK_2=block_2,
            num_warps=num_warps,
        )
        return out, out_scale

    @triton_op("flux_kontext::ln_mod_fp8_rowwise", mutates_args={})
    def ln_mod_fp8(
        first: torch.Tensor,
        second: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        has_second: bool,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_ln_mod_fp8(first, second, shift, scale, has_second, eps)

    return {"ln_mod_fp8": ln_mod_fp8, "launch_ln_mod_fp8": launch_ln_mod_fp8}
