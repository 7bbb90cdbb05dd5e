"""The LoRA side path's up projection added in place, out += low @ up^T, as one Triton kernel: each program reads a
tile of the output once, adds the tile's rank-R product (R = 16..384, from L2-resident low and up tiles) and writes it
back once. It is a memory-bound pass over the output; cuBLAS's ``addmm_`` (beta = 1) does the same arithmetic (fp32
accumulation, one rounding), and which of the two runs is measured once at start (``choose``). The reference is
``reference_low_rank_add`` (what CPUs run); triton is imported only when the kernel is built (GPU).
"""

from __future__ import annotations

import functools

import torch

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


def choose(device: torch.device, rows: int = 4608, cols: int = 12288, rank: int = 48) -> tuple[bool, dict]:
    """(use the Triton kernel, the measurements): both on one FLUX-sized layer, the kernel only where it agrees with
    cuBLAS and is faster."""
    if device.type != "cuda":
        return False, {"kernel": "cublas addmm_", "why": "not a CUDA device"}
    try:
        _kernel()
    except Exception as exc:  # no triton, or it cannot build here
        return False, {"kernel": "cublas addmm_", "why": f"Triton kernel unavailable: {type(exc).__name__}: {exc}"}
    try:
        return _measure(device, rows, cols, rank)
    except Exception as exc:  # a kernel that builds but cannot run here: cuBLAS, and the reason reported
        return False, {"kernel": "cublas addmm_", "why": f"Triton kernel failed: {type(exc).__name__}: {exc}"}


def _measure(device, rows: int, cols: int, rank: int) -> tuple[bool, dict]:
    generator = torch.Generator(device=device).manual_seed(0)
    out = torch.randn(rows, cols, device=device, generator=generator).to(torch.bfloat16)
    low = torch.randn(rows, rank, device=device, generator=generator).to(torch.bfloat16)
    up = (torch.randn(cols, rank, device=device, generator=generator) * 0.05).to(torch.bfloat16)
    want = reference_low_rank_add(out.clone(), low, up)
    got = low_rank_add(out.clone(), low, up, kernel=True)
    error = float((got.float() - want.float()).norm() / want.float().norm())
    ms = {
        name: _ms(lambda k=kernel: low_rank_add(out, low, up, k))
        for name, kernel in (("triton", True), ("cublas", False))
    }
    use = error < 1e-3 and ms["triton"] < ms["cublas"]
    kernel = "triton" if use else "cublas addmm_"
    return use, {"kernel": kernel, "ms": {k: round(v, 4) for k, v in ms.items()}, "rel_error_vs_cublas": error}


def _ms(fn, repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats
