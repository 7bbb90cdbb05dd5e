"""The Triton code of the FP8 GEMM with the gated residual in its epilogue (gemm_residual.py). This module imports
triton: only gemm_residual's launcher imports it.

``fp8_gemm_gated_residual_kernel``: out = residual + gate · ((A · W^T) · a_scale · w_scale + bias), A (M, K) and W
(N, K) in e4m3 read by TMA (wgmma through ``tl.dot``), rowwise scales, bias, and the residual read in the epilogue
from two sources (the single blocks' text rows, then image rows, of each batch element: the concatenation is never
written) with its batch element's gate row; written once, in bf16, by TMA. Tiles in grouped order (GROUP_M row tiles
share their W tiles in L2); ``PERSISTENT``: one program per SM looping over tiles.
"""

import triton
import triton.language as tl


@triton.jit
def fp8_gemm_gated_residual_kernel(
    a_desc,
    w_desc,
    out_desc,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    first_ptr,
    second_ptr,
    gate_ptr,
    M,
    N,
    n_first,
    seq,
    first_sb,
    first_ss,
    second_sb,
    second_ss,
    gate_sb,
    tiles_m,
    tiles_n,
    k_tiles,
    programs,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    tiles = tiles_m * tiles_n
    for tile in tl.range(tl.program_id(0), tiles, programs, flatten=PERSISTENT):  # one tile each unless persistent
        group = tile // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_rows = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group_rows)
        pid_n = (tile % (GROUP_M * tiles_n)) // group_rows
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):  # software-pipelined over the launch's num_stages
            a = a_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        row_in = rows < M
        col_in = cols < N
        a_scale = tl.load(a_scale_ptr + rows, mask=row_in, other=0.0)
        w_scale = tl.load(w_scale_ptr + cols, mask=col_in, other=0.0)
        bias = tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)
        y = acc * a_scale[:, None] * w_scale[None, :] + bias[None, :]
        b = (rows // seq).to(tl.int64)
        s = (rows % seq).to(tl.int64)
        in_first = s < n_first
        mask = row_in[:, None] & col_in[None, :]
        first_rows = first_ptr + (b * first_sb + s * first_ss)[:, None] + cols[None, :]
        second_rows = second_ptr + (b * second_sb + (s - n_first) * second_ss)[:, None] + cols[None, :]
        r_first = tl.load(first_rows, mask=mask & in_first[:, None], other=0.0)
        r_second = tl.load(second_rows, mask=mask & (~in_first)[:, None], other=0.0)
        residual = tl.where(in_first[:, None], r_first, r_second).to(tl.float32)
        gate = tl.load(gate_ptr + (b * gate_sb)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out_desc.store([off_m, off_n], (residual + gate * y).to(tl.bfloat16))
