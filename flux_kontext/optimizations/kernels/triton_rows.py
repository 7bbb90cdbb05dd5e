"""The Triton code of the GELU + FP8 kernels (gelu.py): module-level functions, because Inductor copies a user-defined
kernel's dependencies (the helpers below) from its module's globals into the code it generates (closures are not
followed), and Triton resolves them there too. This module imports triton: only gelu.build imports it (importing the
kernels package never does).

- ``gelu_fp8_kernel``: rows read in two power-of-two pieces (no padded lanes), exp2 and the reciprocal approximate
  (one MUFU instruction each), scales applied as a reciprocal: about half the instructions per element of the padded
  kernel (SASS: 17 vs 36 per element of a feed-forward row), which the GELU is bound by (#18).
- ``gelu_fp8_padded_kernel``: the earlier kernel, one piece per part padded to a power of two; the single blocks'
  [attention | MLP] rows stay on it (bench/kernels_rows.py, BENCHMARKS.md #18: the split kernel was not faster there).
"""

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
def gelu_fp8_padded_kernel(
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
