"""Modulated LayerNorm + FP8: LayerNorm (no affine) + AdaLN modulation x·(1 + scale) + shift, quantized rowwise to
e4m3, the input of the QKV / MLP GEMMs; rows read from two tensors (text, image) when the block concatenates them, so
the concatenation is never written. The Triton kernel next to its PyTorch reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_rowwise_fp8
from flux_kontext.optimizations.kernels.gelu import pieces

# Tokens per program and warps of ln_mod_fp8_kernel_rows by the call's row count (the first entry whose bound is at
# least the rows): bench/kernels_rows.py on H200 (BENCHMARKS.md #18), in-graph µs per launch.
LN_ROWS = ((1024, 1, 4), (1 << 62, 2, 4))


def ln_rows(rows: int) -> tuple[int, int]:
    """(tokens per program, warps) for a call over ``rows`` rows (LN_ROWS)."""
    return next((tokens, warps) for bound, tokens, warps in LN_ROWS if rows <= bound)


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
        tl.store(out_ptr + row * n_cols + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(out_scale_ptr + row, q_scale)

    @triton.jit
    def ln_mod_fp8_kernel_rows(
        first_ptr,
        second_ptr,
        shift_ptr,
        scale_ptr,
        out_ptr,
        out_scale_ptr,
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
        ROWS: tl.constexpr,
        PIECE_1: tl.constexpr,
        PIECE_2: tl.constexpr,
    ):
        # ln_mod_fp8_kernel's arithmetic on ROWS tokens of one batch element per program (grid: token blocks x
        # batch): the modulation (shift, 1 + scale) is loaded and rounded once per program; each row is read in two
        # power-of-two pieces (3,072 = 2,048 + 1,024), no padded lane.
        b = tl.program_id(1).to(tl.int64)
        s = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
        in_seq = s < seq
        src = tl.where(
            s >= n_first,  # never true without a second source: n_first == seq
            second_ptr + b * second_sb + (s - n_first) * second_ss,
            first_ptr + b * first_sb + s * first_ss,
        )
        cols_1 = tl.arange(0, PIECE_1)[None, :]
        mask_1 = cols_1 < n_cols
        x_1 = tl.load(src + cols_1, mask=mask_1 & in_seq, other=0.0).to(tl.float32)
        total = tl.sum(x_1, axis=1)
        if PIECE_2 > 0:
            cols_2 = PIECE_1 + tl.arange(0, PIECE_2)[None, :]
            mask_2 = cols_2 < n_cols
            x_2 = tl.load(src + cols_2, mask=mask_2 & in_seq, other=0.0).to(tl.float32)
            total += tl.sum(x_2, axis=1)
        mean = (total / n_cols)[:, None]
        centered_1 = tl.where(mask_1, x_1 - mean, 0.0)
        var = tl.sum(centered_1 * centered_1, axis=1)
        if PIECE_2 > 0:
            centered_2 = tl.where(mask_2, x_2 - mean, 0.0)
            var += tl.sum(centered_2 * centered_2, axis=1)
        inv_std = tl.rsqrt(var / n_cols + eps)[:, None]
        # x·(1 + scale) + shift with eager bf16's roundings (ln_mod_fp8_kernel's), 0 past the row
        shift_1 = tl.load(shift_ptr + b * shift_sb + cols_1, mask=mask_1, other=0.0).to(tl.float32)
        one_plus_1 = 1.0 + tl.load(scale_ptr + b * scale_sb + cols_1, mask=mask_1, other=0.0).to(tl.float32)
        y_1 = (centered_1 * inv_std).to(tl.bfloat16).to(tl.float32) * one_plus_1.to(tl.bfloat16).to(tl.float32)
        y_1 = tl.where(mask_1, (y_1.to(tl.bfloat16).to(tl.float32) + shift_1).to(tl.bfloat16).to(tl.float32), 0.0)
        amax = tl.max(tl.abs(y_1), axis=1)
        if PIECE_2 > 0:
            shift_2 = tl.load(shift_ptr + b * shift_sb + cols_2, mask=mask_2, other=0.0).to(tl.float32)
            one_plus_2 = 1.0 + tl.load(scale_ptr + b * scale_sb + cols_2, mask=mask_2, other=0.0).to(tl.float32)
            y_2 = (centered_2 * inv_std).to(tl.bfloat16).to(tl.float32) * one_plus_2.to(tl.bfloat16).to(tl.float32)
            y_2 = tl.where(mask_2, (y_2.to(tl.bfloat16).to(tl.float32) + shift_2).to(tl.bfloat16).to(tl.float32), 0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(y_2), axis=1))
        q_scale = tl.maximum(amax, 1e-12)[:, None] / 448.0
        out_row = out_ptr + (b * seq + s) * n_cols
        tl.store(out_row + cols_1, tl.clamp(y_1 / q_scale, -448.0, 448.0).to(tl.float8e4nv), mask=mask_1 & in_seq)
        if PIECE_2 > 0:
            q_2 = tl.clamp(y_2 / q_scale, -448.0, 448.0).to(tl.float8e4nv)
            tl.store(out_row + cols_2, q_2, mask=mask_2 & in_seq)
        tl.store(out_scale_ptr + b * seq + s, q_scale, mask=in_seq)

    def launch_ln_mod_fp8(
        first, second, shift, scale, has_second: bool, eps: float, raw=False, num_warps=None, rows=None
    ):
        """``rows``: tokens per program of ln_mod_fp8_kernel_rows (None: LN_ROWS's choice for this many rows; 0:
        ln_mod_fp8_kernel, one row per program padded to a power of two)."""
        batch, n_first, n_cols = first.shape
        seq = n_first + (second.shape[1] if has_second else 0)
        out = torch.empty((batch * seq, n_cols), dtype=FP8, device=first.device)
        out_scale = torch.empty((batch * seq, 1), dtype=torch.float32, device=first.device)
        strides = (first.stride(0), first.stride(1), second.stride(0), second.stride(1), shift.stride(0))
        rows, warps = ln_rows(batch * seq) if rows is None else (rows, num_warps or 4)
        if rows:
            piece_1, piece_2 = pieces(n_cols)
            launch(ln_mod_fp8_kernel_rows, raw)[(triton.cdiv(seq, rows), batch)](
                *(first, second, shift, scale, out, out_scale, n_first, seq, n_cols, *strides, scale.stride(0), eps),
                ROWS=rows,
                PIECE_1=piece_1,
                PIECE_2=piece_2,
                num_warps=num_warps or warps,
            )
            return out, out_scale
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
            BLOCK=triton.next_power_of_2(n_cols),
            num_warps=num_warps or 4,
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
