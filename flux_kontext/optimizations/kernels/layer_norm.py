"""Modulated LayerNorm + FP8: LayerNorm (no affine) + AdaLN modulation x·(1 + scale) + shift, quantized rowwise to
e4m3, the input of the QKV / MLP GEMMs; rows read from two tensors (text, image) when the block concatenates them, so
the concatenation is never written. The Triton kernel next to its PyTorch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_rowwise_fp8


def reference_ln_mod_fp8(first, second, shift, scale, eps: float, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(cat(first, second)) · (1 + scale) + shift, rounded to the input dtype, quantized rowwise:
    (values (rows, C + extra), scales (rows, 1)); shift and scale are (batch, C). ``extra`` columns after the C
    values are left for the caller to write (LoRA's folded up projection: lora_k_augment.py); here zeros."""
    x = first if second is None else torch.cat([first, second], dim=1)
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)  # diffusers' AdaLayerNormZero: no affine
    modulated = normed * (1 + scale[:, None]) + shift[:, None]
    values, scales = quantize_rowwise_fp8(modulated.reshape(-1, x.shape[-1]))
    if extra:
        values = torch.cat([values, values.new_zeros(values.shape[0], extra)], dim=1)
    return values, scales


def build(launch) -> dict:
    """The Triton kernel, its launcher and the ``flux_kontext::ln_mod_fp8_rowwise`` op (registered: call once per
    process, through kernels.ops()); ``launch(kernel, raw)`` is how launchers call a kernel."""
    import triton
    import triton.language as tl
    from torch.library import triton_op

    @triton.jit
    def ln_mod_fp8_kernel(
        first_ptr,
        second_ptr,
        shift_ptr,
        scale_ptr,
        out_ptr,
        out_scale_ptr,
        out_stride,
        n_first,
        seq,
        n_cols,
        first_sb,
        first_ss,
        second_sb,
        second_ss,
        shift_sb,
        scale_sb,
        eps,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // seq
        s = row % seq
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if s >= n_first:  # never true without a second source: n_first == seq
            x = tl.load(second_ptr + b * second_sb + (s - n_first) * second_ss + cols, mask=mask, other=0.0)
        else:
            x = tl.load(first_ptr + b * first_sb + s * first_ss + cols, mask=mask, other=0.0)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centered = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / n_cols
        normed = (centered * tl.rsqrt(var + eps)).to(tl.bfloat16).to(tl.float32)  # nn.LayerNorm's bf16 output
        shift = tl.load(shift_ptr + b * shift_sb + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * scale_sb + cols, mask=mask, other=0.0).to(tl.float32)
        # x·(1 + scale) + shift with eager bf16's roundings: each op's result is bf16.
        one_plus = (1.0 + scale).to(tl.bfloat16).to(tl.float32)
        y = (normed * one_plus).to(tl.bfloat16).to(tl.float32)
        y = (y + shift).to(tl.bfloat16).to(tl.float32)  # the bf16 activation of the GEMM
        y = tl.where(mask, y, 0.0)
        q_scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
        q = tl.clamp(y / q_scale, -448.0, 448.0)
        tl.store(out_ptr + row * out_stride + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(out_scale_ptr + row, q_scale)

    def launch_ln_mod_fp8(
        first, second, shift, scale, has_second: bool, eps: float, extra: int = 0, raw=False, num_warps=4
    ):
        """``extra``: columns left unwritten after each row's C values (the caller writes them)."""
        batch, n_first, n_cols = first.shape
        seq = n_first + (second.shape[1] if has_second else 0)
        out = torch.empty((batch * seq, n_cols + extra), dtype=FP8, device=first.device)
        out_scale = torch.empty((batch * seq, 1), dtype=torch.float32, device=first.device)
        launch(ln_mod_fp8_kernel, raw)[(batch * seq,)](
            first,
            second,
            shift,
            scale,
            out,
            out_scale,
            out.stride(0),
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
            BLOCK=triton.next_power_of_2(n_cols),
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
        extra: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_ln_mod_fp8(first, second, shift, scale, has_second, eps, extra)

    return {"ln_mod_fp8": ln_mod_fp8, "launch_ln_mod_fp8": launch_ln_mod_fp8}
