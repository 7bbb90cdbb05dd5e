"""The LoRA side path's up projection added in place, out += low @ up^T, as one Triton kernel: each program reads a
tile of the output once, adds the tile's rank-R product (R = 16..384, from L2-resident low and up tiles) and writes it
back once. It is a memory-bound pass over the output; cuBLAS's ``addmm_`` (beta = 1) does the same arithmetic (fp32
accumulation, bf16 result), and which of the two runs on each layer shape is measured once at start (``choose``).
The reference is ``reference_low_rank_add`` (what CPUs run); triton is imported only when the kernel is built (GPU).
"""

from __future__ import annotations

import functools

import torch

from flux_kontext.gpu_timing import gpu_milliseconds

BLOCK_M, BLOCK_N, BLOCK_R, NUM_WARPS = 64, 128, 16, 4


def reference_low_rank_add(out: torch.Tensor, low: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """out += low @ up^T in place (cuBLAS on the GPU); returns ``out``."""
    return out.addmm_(low.to(out.dtype), up.t().to(out.dtype))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def low_rank_add_kernel(
        out_ptr,
        low_ptr,
        up_ptr,
        rows,
        cols,
        rank,
        out_stride,
        low_stride,
        up_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, rank, BLOCK_R):
            rr = start + tl.arange(0, BLOCK_R)
            low = tl.load(
                low_ptr + rm[:, None] * low_stride + rr[None, :],
                mask=(rm[:, None] < rows) & (rr[None, :] < rank),
                other=0.0,
            )
            up = tl.load(
                up_ptr + rn[None, :] * up_stride + rr[:, None],
                mask=(rn[None, :] < cols) & (rr[:, None] < rank),
                other=0.0,
            )
            acc = tl.dot(low, up, acc)
        mask = (rm[:, None] < rows) & (rn[None, :] < cols)
        pointers = out_ptr + rm[:, None] * out_stride + rn[None, :]
        out = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
        tl.store(pointers, (out + acc).to(out_ptr.dtype.element_ty), mask=mask)

    def launch(out: torch.Tensor, low: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        rows, cols = out.shape
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))
        low_rank_add_kernel[grid](
            out,
            low,
            up,
            rows,
            cols,
            low.shape[1],
            out.stride(0),
            low.stride(0),
            up.stride(0),
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_R=BLOCK_R,
            num_warps=NUM_WARPS,
        )
        return out

    return launch


def low_rank_add(out: torch.Tensor, low: torch.Tensor, up: torch.Tensor, kernel: bool) -> torch.Tensor:
    """out += low @ up^T in place: the Triton kernel when ``kernel`` (CUDA, rows of unit stride), else cuBLAS."""
    if kernel and out.is_cuda and out.stride(1) == 1 and low.stride(1) == 1 and up.stride(1) == 1:
        return _kernel()(out, low.to(out.dtype), up.to(out.dtype))
    return reference_low_rank_add(out, low, up)


# The two differ by bf16's rounding of the sum (at most one unit in the last place, 2^-8 relative), never more.
AGREEMENT = 2.0**-8


def choose(device: torch.device, shapes: set[tuple[int, int]], rows: int = 4608) -> tuple[dict, dict]:
    """({(out width, rank): use the Triton kernel}, the measurements): both ways on each layer shape, at ``rows``
    tokens; the kernel where it agrees with cuBLAS and is faster (it wins on the wide q|k|v and MLP outputs,
    cuBLAS on 3072-wide ones: BENCHMARKS.md, "LoRA adapters")."""
    none = dict.fromkeys(shapes, False)
    if device.type != "cuda":
        return none, {"kernel": "cublas addmm_", "why": "not a CUDA device"}
    try:
        _kernel()
        measured = {shape: _measure(device, rows, *shape) for shape in sorted(shapes)}
    except Exception as exc:  # no triton, or a kernel that cannot build or run here: cuBLAS, and the reason
        return none, {"kernel": "cublas addmm_", "why": f"Triton kernel unavailable: {type(exc).__name__}: {exc}"}
    use = {shape: row["error"] < AGREEMENT and row["triton_ms"] < row["cublas_ms"] for shape, row in measured.items()}
    data = {
        f"{cols}x{rank}": {**row, "kernel": "triton" if use[(cols, rank)] else "cublas"}
        for (cols, rank), row in measured.items()
    }
    return use, {"rows": rows, "by_layer_shape": data}


def _measure(device, rows: int, cols: int, rank: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    out = torch.randn(rows, cols, device=device, generator=generator).to(torch.bfloat16)
    low = torch.randn(rows, rank, device=device, generator=generator).to(torch.bfloat16)
    up = (torch.randn(cols, rank, device=device, generator=generator) * 0.05).to(torch.bfloat16)
    want = reference_low_rank_add(out.clone(), low, up)
    got = low_rank_add(out.clone(), low, up, kernel=True)
    error = float((got.float() - want.float()).norm() / want.float().norm())
    times = {
        name: gpu_milliseconds(lambda k=kernel: low_rank_add(out, low, up, k))
        for name, kernel in (("triton", True), ("cublas", False))
    }
    return {"triton_ms": round(times["triton"], 4), "cublas_ms": round(times["cublas"], 4), "error": error}


# ----- the down projection x8 A^T from the FP8 activations ------------------------------------------------------------
# cuBLAS runs x8 A^T (M x K x R, R = 16-64) on 128x128 tiles: 36 CTAs at 4608 rows, each looping over all of K, about
# 19 µs at K = 3072 where the bytes (x8 read once) take about 3.5 µs (BENCHMARKS.md, LoRA, sixth session). This kernel
# gives each program BLOCK_M rows and all R columns, so 4608 rows are 72-144 programs reading x8 once; which block
# size, and whether it beats cuBLAS with the same result, is measured per (K, R) at start (``choose_down``).
DOWN_CONFIGS = ((32, 256, 4), (64, 256, 4), (64, 128, 4))  # (BLOCK_M, BLOCK_K, warps), tried at start


@functools.cache
def _down_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def down_projection_kernel(
        x_ptr,
        a_ptr,
        sx_ptr,
        sa_ptr,
        out_ptr,
        rows,
        fan_in,
        rank,
        x_stride,
        sx_stride,
        a_stride,
        out_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for start in range(0, fan_in, BLOCK_K):
            rk = start + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rm[:, None] * x_stride + rk[None, :],
                mask=(rm[:, None] < rows) & (rk[None, :] < fan_in),
                other=0.0,
            )
            a = tl.load(  # (BLOCK_K, BLOCK_R) of A^T: K contiguous, as the FP8 tensor-core op takes its B operand
                a_ptr + rr[None, :] * a_stride + rk[:, None],
                mask=(rr[None, :] < rank) & (rk[:, None] < fan_in),
                other=0.0,
            )
            acc = tl.dot(x, a, acc)
        sx = tl.load(sx_ptr + rm * sx_stride, mask=rm < rows, other=0.0)
        sa = tl.load(sa_ptr + rr, mask=rr < rank, other=0.0)
        out = acc * sx[:, None] * sa[None, :]
        mask = (rm[:, None] < rows) & (rr[None, :] < rank)
        tl.store(out_ptr + rm[:, None] * out_stride + rr[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    def launch(values, scale, down8, down_scale, config) -> torch.Tensor:
        block_m, block_k, warps = config
        rows, fan_in = values.shape
        rank = down8.shape[0]
        out = torch.empty((rows, rank), dtype=torch.bfloat16, device=values.device)
        down_projection_kernel[(triton.cdiv(rows, block_m),)](
            values,
            down8,
            scale,
            down_scale,
            out,
            rows,
            fan_in,
            rank,
            values.stride(0),
            scale.stride(0),
            down8.stride(0),
            out.stride(0),
            BLOCK_M=block_m,
            BLOCK_R=max(16, triton.next_power_of_2(rank)),
            BLOCK_K=block_k,
            num_warps=warps,
        )
        return out

    return launch


@torch.library.custom_op("flux_kontext::lora_down_projection", mutates_args=())
def down_projection_kernel(
    values: torch.Tensor, scale: torch.Tensor, down8: torch.Tensor, down_scale: torch.Tensor, config: list[int]
) -> torch.Tensor:
    """x A^T (M, R) in bf16 from rowwise e4m3 activations (values (M, K), rows of unit stride; scale (M, 1)) and A in
    e4m3 (down8 (R, K), down_scale (1, R)): the Triton kernel with ``config`` (BLOCK_M, BLOCK_K, warps)."""
    return _down_kernel()(values, scale, down8, down_scale, tuple(config))


@down_projection_kernel.register_fake
def _(values, scale, down8, down_scale, config):
    return values.new_empty((values.shape[0], down8.shape[0]), dtype=torch.bfloat16)


def cublas_down_projection(values, scale, down8, down_scale, dtype) -> torch.Tensor:
    """x A^T by cuBLAS's rowwise-scaled FP8 GEMM (what CPUs run too)."""
    return torch._scaled_mm(values, down8.t(), scale_a=scale, scale_b=down_scale, out_dtype=dtype)


def choose_down(device: torch.device, shapes: set[tuple[int, int]], rows: int = 4608) -> dict:
    """The measurements and choice per (K, R): the Triton down projection's fastest config where it agrees with cuBLAS
    (bf16 rounding of the same fp32 sums) and is faster; ``by_shape`` absent where it cannot run (the reason given)."""
    if device.type != "cuda":
        return {"kernel": "cublas _scaled_mm", "why": "not a CUDA device"}
    try:
        _down_kernel()
        measured = {shape: _measure_down(device, rows, *shape) for shape in sorted(shapes)}
    except Exception as exc:  # no triton, or a kernel that cannot build or run here: cuBLAS, and the reason
        return {"kernel": "cublas _scaled_mm", "why": f"Triton kernel unavailable: {type(exc).__name__}: {exc}"}
    return {"rows": rows, "by_shape": {f"K{fan_in}xR{rank}": row for (fan_in, rank), row in measured.items()}}


def _measure_down(device, rows: int, fan_in: int, rank: int) -> dict:
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8

    generator = torch.Generator(device=device).manual_seed(0)
    wide = torch.randn(rows, fan_in + 64, device=device, generator=generator)  # x8 as a strided view, as x_aug's
    values, scale = quantize_rowwise_fp8(wide)
    values = values[:, :fan_in]
    down8, down_scale = quantize_rowwise_fp8(torch.randn(rank, fan_in, device=device, generator=generator))
    down_scale = down_scale.view(1, -1)
    want = cublas_down_projection(values, scale, down8, down_scale, torch.bfloat16)
    row = {
        "cublas_ms": round(
            gpu_milliseconds(lambda: cublas_down_projection(values, scale, down8, down_scale, torch.bfloat16)), 4
        )
    }
    best = None
    for config in DOWN_CONFIGS:
        got = down_projection_kernel(values, scale, down8, down_scale, list(config))
        error = float((got.float() - want.float()).norm() / want.float().norm())
        ms = gpu_milliseconds(lambda c=config: down_projection_kernel(values, scale, down8, down_scale, list(c)))
        row[f"triton_{config[0]}x{config[1]}w{config[2]}_ms"] = round(ms, 4)
        row[f"triton_{config[0]}x{config[1]}w{config[2]}_error"] = error
        if error < AGREEMENT and (best is None or ms < best[1]):
            best = (config, ms)
    row["kernel"] = "triton" if best is not None and best[1] < row["cublas_ms"] else "cublas"
    row["config"] = list(best[0]) if row["kernel"] == "triton" else None
    return row
