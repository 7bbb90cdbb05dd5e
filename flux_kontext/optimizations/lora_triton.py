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
