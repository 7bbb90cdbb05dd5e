"""The Triton code of the row kernels whose helpers are other Triton functions (gelu.py, layer_norm.py): module-level
functions, because Inductor copies a user-defined kernel's dependencies from its module's globals into the code it
generates (closures are not followed), and Triton resolves them there too. This module imports triton: only the
kernels' ``build`` functions import it (importing the kernels package never does)."""

import triton
import triton.language as tl

from flux_kontext.optimizations.kernels import gelu as _gelu

# The sigmoid form's exponent in base 2: sigmoid(2z) = 1 / (1 + 2^t), t = -2·sqrt(2/pi)·log2(e)·(x + 0.044715·x³).
GELU_A = tl.constexpr(_gelu.GELU_A)
GELU_B = tl.constexpr(_gelu.GELU_B)


@triton.jit
def exp2_approx(y, FAST: tl.constexpr):
    if FAST:  # one MUFU.EX2: no range fix-up (FTZ; results below 2^-126 are 0, which the sigmoid takes as 0)
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [y], tl.float32, True, 1)
    return tl.exp2(y)


@triton.jit
def reciprocal_approx(y, FAST: tl.constexpr):
    if FAST:  # one MUFU.RCP (1 + e, e >= 0: no zero or denormal to fix; 1/inf is 0)
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [y], tl.float32, True, 1)
    return 1.0 / y


@triton.jit
def gelu_piece(ptr, start, n, BLOCK: tl.constexpr, GELU: tl.constexpr, FAST: tl.constexpr):
    """BLOCK columns from ``start`` (masked at n) in fp32; GELU'd and rounded to bf16 when GELU."""
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # x·sigmoid(2·sqrt(2/pi)·(x + 0.044715·x³)) with the exponent in base 2: x·1/(1 + 2^(x·(A + B·x²)))
        t = x * (x * x * GELU_B + GELU_A)
        x = (x * reciprocal_approx(1.0 + exp2_approx(t, FAST), FAST)).to(tl.bfloat16).to(tl.float32)
    return x, cols, mask


@triton.jit
def store_fp8(ptr, offset, x, cols, mask, inverse_scale):
    q = tl.clamp(x * inverse_scale, -448.0, 448.0)
    tl.store(ptr + offset + cols, q.to(tl.float8e4nv), mask=mask)


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
    ATTN_1: tl.constexpr,
    ATTN_2: tl.constexpr,
    MLP_1: tl.constexpr,
    MLP_2: tl.constexpr,
    FAST: tl.constexpr,
):
    # One row per program, held in registers, read in two power-of-two pieces per part (12,288 = 8,192 + 4,096;
    # 3,072 = 2,048 + 1,024) rather than one padded to the next power of two: the kernel is bound by the
    # instructions it issues per element, and padded lanes issue them too.
    row = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + row * out_stride
    offset = n_attn if HAS_ATTN else 0
    m1, cm1, km1 = gelu_piece(mlp_ptr + row * mlp_stride, 0, n_mlp, MLP_1, True, FAST)
    amax = tl.max(tl.abs(m1), axis=0)
    if MLP_2 > 0:
        m2, cm2, km2 = gelu_piece(mlp_ptr + row * mlp_stride, MLP_1, n_mlp, MLP_2, True, FAST)
        amax = tl.maximum(amax, tl.max(tl.abs(m2), axis=0))
    if HAS_ATTN:
        a1, ca1, ka1 = gelu_piece(attn_ptr + row * attn_stride, 0, n_attn, ATTN_1, False, FAST)
        amax = tl.maximum(amax, tl.max(tl.abs(a1), axis=0))
        if ATTN_2 > 0:
            a2, ca2, ka2 = gelu_piece(attn_ptr + row * attn_stride, ATTN_1, n_attn, ATTN_2, False, FAST)
            amax = tl.maximum(amax, tl.max(tl.abs(a2), axis=0))
    scale = tl.maximum(amax, 1e-12) / 448.0
    inverse_scale = 1.0 / scale
    if HAS_ATTN:
        store_fp8(out_row, 0, a1, ca1, ka1, inverse_scale)
        if ATTN_2 > 0:
            store_fp8(out_row, 0, a2, ca2, ka2, inverse_scale)
    store_fp8(out_row, offset, m1, cm1, km1, inverse_scale)
    if MLP_2 > 0:
        store_fp8(out_row, offset, m2, cm2, km2, inverse_scale)
    tl.store(scale_ptr + row, scale)


@triton.jit
def modulated(x, cols, mask, mean, inv_std, shift_row, scale_row):
    """One piece of the row: normalized, times 1 + scale, plus shift, with eager bf16's roundings (each op's
    result is bf16): the bf16 activation of the GEMM, in fp32, 0 outside the row."""
    normed = ((x - mean) * inv_std).to(tl.bfloat16).to(tl.float32)  # nn.LayerNorm's bf16 output
    shift = tl.load(shift_row + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_row + cols, mask=mask, other=0.0).to(tl.float32)
    one_plus = (1.0 + scale).to(tl.bfloat16).to(tl.float32)
    y = (normed * one_plus).to(tl.bfloat16).to(tl.float32)
    y = (y + shift).to(tl.bfloat16).to(tl.float32)
    return tl.where(mask, y, 0.0)


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
    BLOCK_1: tl.constexpr,
    BLOCK_2: tl.constexpr,
):
    # The row in two power-of-two pieces (3,072 = 2,048 + 1,024; see gelu.pieces): padded lanes would issue every
    # instruction too, and the kernel is bound by the instructions per element.
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    s = row % seq
    if s >= n_first:  # never true without a second source: n_first == seq
        src = second_ptr + b * second_sb + (s - n_first) * second_ss
    else:
        src = first_ptr + b * first_sb + s * first_ss
    cols_1 = tl.arange(0, BLOCK_1)
    mask_1 = cols_1 < n_cols
    x_1 = tl.load(src + cols_1, mask=mask_1, other=0.0).to(tl.float32)
    total = tl.sum(x_1, axis=0)
    if BLOCK_2 > 0:
        cols_2 = BLOCK_1 + tl.arange(0, BLOCK_2)
        mask_2 = cols_2 < n_cols
        x_2 = tl.load(src + cols_2, mask=mask_2, other=0.0).to(tl.float32)
        total += tl.sum(x_2, axis=0)
    mean = total / n_cols
    centered_1 = tl.where(mask_1, x_1 - mean, 0.0)
    squares = tl.sum(centered_1 * centered_1, axis=0)
    if BLOCK_2 > 0:
        centered_2 = tl.where(mask_2, x_2 - mean, 0.0)
        squares += tl.sum(centered_2 * centered_2, axis=0)
    inv_std = tl.rsqrt(squares / n_cols + eps)
    shift_row, scale_row = shift_ptr + b * shift_sb, scale_ptr + b * scale_sb
    y_1 = modulated(x_1, cols_1, mask_1, mean, inv_std, shift_row, scale_row)
    amax = tl.max(tl.abs(y_1), axis=0)
    if BLOCK_2 > 0:
        y_2 = modulated(x_2, cols_2, mask_2, mean, inv_std, shift_row, scale_row)
        amax = tl.maximum(amax, tl.max(tl.abs(y_2), axis=0))
    q_scale = tl.maximum(amax, 1e-12) / 448.0
    inverse = 1.0 / q_scale
    tl.store(out_ptr + row * n_cols + cols_1, tl.clamp(y_1 * inverse, -448.0, 448.0).to(tl.float8e4nv), mask=mask_1)
    if BLOCK_2 > 0:
        q_2 = tl.clamp(y_2 * inverse, -448.0, 448.0).to(tl.float8e4nv)
        tl.store(out_ptr + row * n_cols + cols_2, q_2, mask=mask_2)
    tl.store(out_scale_ptr + row, q_scale)
