"""The Triton code of the rowwise FP8 kernels around the blocks' LayerNorms (layer_norm.py): module-level functions,
because Inductor copies a user-defined kernel's dependencies (the helper below) from its module's globals into the
code it generates (closures are not followed). This module imports triton: only layer_norm.build imports it.

One program per row of ``n_cols`` (padded to ``BLOCK``, a power of two), the row held in registers:

- ``ln_mod_fp8_kernel``: LayerNorm (no affine) + AdaLN modulation + rowwise e4m3, rows from one or two sources.
- ``residual_ln_mod_fp8_kernel``: the double blocks' gated residual x + gate·y (y: the attention output projection)
  written as the new hidden states, then the same LayerNorm + modulation + e4m3 of it (#18: the residual was an
  Inductor kernel of its own, which read x and y, wrote x, and the LayerNorm read x again).
- ``rows_fp8_kernel``: plain rowwise e4m3 (the double blocks' joint attention output, the input of to_out /
  to_add_out, in one launch for both streams; torchao quantized each stream in an Inductor reduction).
"""

import triton
import triton.language as tl


@triton.jit
def modulate_quantize_store(
    x, cols, mask, n_cols, b, row, shift_ptr, scale_ptr, shift_sb, scale_sb, out_ptr, out_stride, out_scale_ptr, eps
):
    """LayerNorm of the fp32 row ``x`` (0 past ``n_cols``), x·(1 + scale) + shift with eager bf16's roundings, e4m3
    with the row's scale (absmax / 448), stored at ``row`` (``out_stride`` apart: LoRA's fold leaves columns after
    each row's ``n_cols`` for its own kernel)."""
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
    modulate_quantize_store(
        x, cols, mask, n_cols, b, row, shift_ptr, scale_ptr, shift_sb, scale_sb, out_ptr, out_stride, out_scale_ptr, eps
    )


@triton.jit
def residual_ln_mod_fp8_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    shift_ptr,
    scale_ptr,
    x_out_ptr,
    out_ptr,
    out_scale_ptr,
    out_stride,
    seq,
    n_cols,
    x_sb,
    x_ss,
    y_sb,
    y_ss,
    gate_sb,
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
    x = tl.load(x_ptr + b * x_sb + s * x_ss + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * y_sb + s * y_ss + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_sb + cols, mask=mask, other=0.0).to(tl.float32)
    # x + gate·y in fp32, rounded once to bf16: what Inductor's fused add/mul kernel computed in the compiled block.
    x = (x + gate * y).to(tl.bfloat16)
    tl.store(x_out_ptr + row * n_cols + cols, x, mask=mask)
    modulate_quantize_store(
        x.to(tl.float32),
        cols,
        mask,
        n_cols,
        b,
        row,
        shift_ptr,
        scale_ptr,
        shift_sb,
        scale_sb,
        out_ptr,
        out_stride,
        out_scale_ptr,
        eps,
    )


@triton.jit
def rows_fp8_kernel(x_ptr, out_ptr, out_scale_ptr, n_cols, x_stride, BLOCK: tl.constexpr):
    # e4m3 with the row's scale, absmax / 448 floored at 1e-12, the division rounded to nearest (as PyTorch's).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    q_scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
    q = tl.clamp(tl.div_rn(x, q_scale), -448.0, 448.0)
    tl.store(out_ptr + row * n_cols + cols, q.to(tl.float8e4nv), mask=mask)
    tl.store(out_scale_ptr + row, q_scale)
