"""The Triton code of the GELU + FP8 kernels (gelu.py): module-level functions, because Inductor copies a user-defined
kernel's dependencies (the helpers below) from its module's globals into the code it generates (closures are not
followed), and Triton resolves them there too. This module imports triton: only gelu.build imports it (importing the
kernels package never does).

- ``gelu_fp8_kernel``: rows read in two power-of-two pieces (no padded lanes), exp2 and the reciprocal approximate
  (one MUFU instruction each), scales applied as a reciprocal: about half the instructions per element of the padded
  kernel (SASS: 17 vs 36 per element of a feed-forward row), which the GELU is bound by (#18).
- ``gelu_fp8_kernel_two_pass``: the single blocks' [attention | MLP] rows (15,360 wide): tiles of the row, read twice
  (absmax, then GELU + quantization from L2), few registers, so many rows are in flight per SM where the kernels
  holding the row in registers fit one or two; the same codes as ``gelu_fp8_kernel`` (gelu.GELU_KERNEL; in-graph on
  H200 72.6 µs per launch against 100.8 padded, 79.1 split: bench/kernels_rows.py, BENCHMARKS.md #18).
- ``gelu_fp8_padded_kernel``: the earliest kernel, one piece per part padded to a power of two (comparisons).
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
        x = gelu_bf16(x, FAST)
    return x, cols, mask


@triton.jit
def gelu_bf16(x, FAST: tl.constexpr):
    """GELU (tanh form) of fp32 ``x``, rounded to bf16 (as the unfused path stores it), back in fp32."""
    # x·sigmoid(2·sqrt(2/pi)·(x + 0.044715·x³)) with the exponent in base 2: x·1/(1 + 2^(x·(A + B·x²)))
    t = x * (x * x * GELU_B + GELU_A)
    return (x * reciprocal_approx(1.0 + exp2_approx(t, FAST), FAST)).to(tl.bfloat16).to(tl.float32)


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


# Above this, a row's largest GELU output is its absmax: |GELU(x)| <= 0.170 for x < 0 (the minimum, at x ~ -0.75).
NEGATIVE_SIDE_BOUND = tl.constexpr(_gelu.GELU_NEGATIVE_SIDE_BOUND)


@triton.jit
def load_tile(ptr, cols, n, EVEN: tl.constexpr, KEEP: tl.constexpr):
    """A tile of a row in fp32 (masked at n unless EVEN; 0 past it); KEEP: the first of two reads, kept in L2."""
    if EVEN:
        if KEEP:
            x = tl.load(ptr + cols, eviction_policy="evict_last")
        else:
            x = tl.load(ptr + cols, eviction_policy="evict_first")
    elif KEEP:
        x = tl.load(ptr + cols, mask=cols < n, other=0.0, eviction_policy="evict_last")
    else:
        x = tl.load(ptr + cols, mask=cols < n, other=0.0, eviction_policy="evict_first")
    return x.to(tl.float32)


@triton.jit
def store_fp8_tile(ptr, cols, n, x, inverse_scale, EVEN: tl.constexpr):
    q = tl.clamp(x * inverse_scale, -448.0, 448.0).to(tl.float8e4nv)
    if EVEN:
        tl.store(ptr + cols, q)
    else:
        tl.store(ptr + cols, q, mask=cols < n)


@triton.jit
def gelu_fp8_kernel_two_pass(
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
    ATTN_BLOCK: tl.constexpr,
    MLP_BLOCK: tl.constexpr,
    EVEN_ATTN: tl.constexpr,
    EVEN_MLP: tl.constexpr,
    FAST: tl.constexpr,
):
    # One row per program in tiles, few registers, so many rows are in flight per SM (the row-in-registers kernels
    # hold one or two 15,360-wide rows per SM and wait on each). Pass 1 reads the row for its absmax: GELU rounded to
    # bf16 is non-decreasing above its minimum, so the MLP part's largest output is GELU of its largest input, and
    # only rows whose absmax stays below NEGATIVE_SIDE_BOUND need |GELU| of every element (a third read). Pass 2
    # reads the row again (from L2: pass 1 keeps it there), GELU, quantizes with the row's scale, writes. The GELU
    # arithmetic is gelu_fp8_kernel's: the same codes and scales.
    row = tl.program_id(0).to(tl.int64)
    mlp_row = mlp_ptr + row * mlp_stride
    attn_row = attn_ptr + row * attn_stride
    out_row = out_ptr + row * out_stride
    mlp_lanes = tl.arange(0, MLP_BLOCK)
    top = tl.zeros((MLP_BLOCK,), dtype=tl.float32)  # max(0, largest input) per lane
    for start in range(0, n_mlp, MLP_BLOCK):
        top = tl.maximum(top, load_tile(mlp_row, start + mlp_lanes, n_mlp, EVEN_MLP, True))
    amax = tl.max(gelu_bf16(top, FAST), axis=0)
    if HAS_ATTN:
        attn_lanes = tl.arange(0, ATTN_BLOCK)
        attn_top = tl.zeros((ATTN_BLOCK,), dtype=tl.float32)
        for start in range(0, n_attn, ATTN_BLOCK):
            attn_top = tl.maximum(attn_top, tl.abs(load_tile(attn_row, start + attn_lanes, n_attn, EVEN_ATTN, True)))
        amax = tl.maximum(amax, tl.max(attn_top, axis=0))
    if amax < NEGATIVE_SIDE_BOUND:  # GELU's negative side may hold the absmax: take |GELU| of every element
        low = tl.zeros((MLP_BLOCK,), dtype=tl.float32)
        for start in range(0, n_mlp, MLP_BLOCK):
            low = tl.maximum(low, tl.abs(gelu_bf16(load_tile(mlp_row, start + mlp_lanes, n_mlp, EVEN_MLP, True), FAST)))
        amax = tl.maximum(amax, tl.max(low, axis=0))
    scale = tl.maximum(amax, 1e-12) / 448.0
    inverse_scale = 1.0 / scale
    if HAS_ATTN:
        for start in range(0, n_attn, ATTN_BLOCK):
            cols = start + attn_lanes
            x = load_tile(attn_row, cols, n_attn, EVEN_ATTN, False)
            store_fp8_tile(out_row, cols, n_attn, x, inverse_scale, EVEN_ATTN)
    out_mlp = out_row + (n_attn if HAS_ATTN else 0)
    for start in range(0, n_mlp, MLP_BLOCK):
        cols = start + mlp_lanes
        x = gelu_bf16(load_tile(mlp_row, cols, n_mlp, EVEN_MLP, False), FAST)
        store_fp8_tile(out_mlp, cols, n_mlp, x, inverse_scale, EVEN_MLP)
    tl.store(scale_ptr + row, scale)
