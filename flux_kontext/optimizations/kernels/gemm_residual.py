"""The single blocks' output projection with the gated residual in the GEMM's epilogue (#18):
cat(text, image) + gate · proj_out(x) in one Triton FP8 GEMM (triton_gemm.py), where the fused blocks ran cuBLAS's
rowwise FP8 GEMM (``torch._scaled_mm``, which takes no C input) and then Inductor's add/mul kernel over the hidden
states (one more read of the GEMM's output and the residual, one more write). Next to it, its PyTorch reference and
the start-up measurement that decides whether the blocks use it (``measure``: right and no slower than cuBLAS's GEMM
alone plus a margin the saved pass pays for).

On H200 (bench/gemm_epilogue.py, BENCHMARKS.md #18, in-graph µs per launch, 4,608 x 15,360 x 3,072): cuBLAS 330.4,
cuBLAS + Inductor's residual 378.1, this kernel's first form (the residual read by TMA, one source) 334.7 persistent
at 128 x 128 x 128 tiles, 8 warps, 4 stages.
"""

from __future__ import annotations

import logging
import statistics

import torch

log = logging.getLogger(__name__)

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, persistent): the measured best (bench/gemm_epilogue.py; 128 x 256 tiles
# do not fit the shared memory at 3 stages, the non-persistent grid ran 370.9 µs).
CONFIG = (128, 128, 128, 8, 4, True)
# Use the fused GEMM where it costs at most this much more than cuBLAS's GEMM alone: the residual pass it saves took
# 19.4 µs in the step (5.9% of the 330 µs GEMM; the profile of BENCHMARKS.md #18) and 47.7 µs in the bench.
MAX_SLOWDOWN = 1.04


def reference_fp8_gemm_gated_residual(values, scale, weight_t, weight_scale, bias, first, second, gate):
    """cat(first, second) + gate · ((values · scale) W^T + bias), as the fused single block computed it: the rowwise
    FP8 GEMM to bf16, then the gated residual; (batch, tokens, N)."""
    out = torch._scaled_mm(
        values, weight_t, scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=first.dtype, use_fast_accum=True
    )
    residual = torch.cat([first, second], dim=1)
    return residual + gate.unsqueeze(1) * out.view(residual.shape[0], residual.shape[1], -1)


def launch(values, scale, weight_t, weight_scale, bias, first, second, gate, config=CONFIG) -> torch.Tensor:
    """The Triton kernel on CUDA tensors: values (M, K) e4m3 with scale (M, 1), weight_t (K, N) the column-major view
    of a (N, K) row-major e4m3 weight (fp8_blocks.expose_fp8_weight) with weight_scale (1, N), bias (N,), residual
    rows first (batch, T, N) then second (batch, S - T, N), gate (batch, N): (batch, S, N) bf16."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    from flux_kontext.optimizations.kernels.triton_gemm import fp8_gemm_gated_residual_kernel

    block_m, block_n, block_k, warps, stages, persistent = config
    first, second, gate = (t if t.stride(-1) == 1 else t.contiguous() for t in (first, second, gate))
    (m, k), n = values.shape, weight_t.shape[1]
    batch, n_first = first.shape[:2]
    seq = n_first + second.shape[1]
    out = torch.empty((batch, seq, n), dtype=torch.bfloat16, device=values.device)
    tiles_m, tiles_n = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    programs = min(torch.cuda.get_device_properties(values.device).multi_processor_count, tiles_m * tiles_n)
    fp8_gemm_gated_residual_kernel[(programs if persistent else tiles_m * tiles_n,)](
        TensorDescriptor.from_tensor(values, [block_m, block_k]),
        TensorDescriptor.from_tensor(weight_t.t(), [block_n, block_k]),
        TensorDescriptor.from_tensor(out.view(m, n), [block_m, block_n]),
        scale,
        weight_scale,
        bias,
        first,
        second,
        gate,
        m,
        n,
        n_first,
        seq,
        first.stride(0),
        first.stride(1),
        second.stride(0),
        second.stride(1),
        gate.stride(0),
        tiles_m,
        tiles_n,
        triton.cdiv(k, block_k),
        programs if persistent else tiles_m * tiles_n,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        PERSISTENT=persistent,
        num_warps=warps,
        num_stages=stages,
    )
    return out


@torch.library.custom_op("flux_kontext::fp8_gemm_gated_residual", mutates_args=())
def fp8_gemm_gated_residual(
    values: torch.Tensor,
    scale: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """An opaque call for torch.compile (Inductor calls it as it is; under CUDA graphs its launch is captured). On
    the CPU, or with operands TMA cannot read (never on the fused blocks' tensors), the reference: cuBLAS then the
    residual, logged once."""
    if not values.is_cuda or not _tma_readable(values, weight_t, scale, weight_scale):
        if values.is_cuda and not _WARNED:
            _WARNED.append(True)
            log.warning("fp8_gemm_gated_residual: operands TMA cannot read; cuBLAS + the residual instead")
        return reference_fp8_gemm_gated_residual(values, scale, weight_t, weight_scale, bias, first, second, gate)
    return launch(values, scale, weight_t, weight_scale, bias, first, second, gate)


_WARNED: list = []  # the fallback's warning, once per process


def _tma_readable(values, weight_t, scale, weight_scale) -> bool:
    """values (M, K) and weight_t.t() (N, K) row-major, 16-byte aligned rows; the scales one float per row / column."""
    weight = weight_t.t()
    return (
        values.is_contiguous()
        and weight.is_contiguous()
        and values.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
        and values.shape[1] % 16 == 0
        and weight.shape[0] % 8 == 0  # the bf16 output's rows 16-byte aligned
        and scale.is_contiguous()
        and weight_scale.stride(-1) == 1
    )


@fp8_gemm_gated_residual.register_fake
def _(values, scale, weight_t, weight_scale, bias, first, second, gate):
    return first.new_empty((first.shape[0], first.shape[1] + second.shape[1], weight_t.shape[1]))


def _ms(fn, repeats: int = 5, calls: int = 10) -> float:
    """Milliseconds per call of ``fn()`` on the GPU: the median over ``repeats`` of ``calls`` back-to-back calls
    between two CUDA events, after two untimed calls (compiles, first choices). Back to back, the GPU never waits for
    the host's next launch (the blocks run under CUDA graphs or ahead of the GPU): one call per event pair timed the
    Triton launcher's Python too (on H200, 0.44 ms one per pair against 0.355 back to back, where the kernel took
    0.34 in a graph: bench/gemm_epilogue.py, BENCHMARKS.md #18)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


@torch.inference_mode()
def measure(linear, text_tokens: int = 512, image_tokens: int = 4096) -> dict:
    """Whether a single block's proj_out (rowwise FP8, exposed: fp8_blocks.expose_fp8_weight) should use the fused
    GEMM: on a 1024² step's rows with random activations, its error against fp32 arithmetic no worse than the
    cuBLAS path's (x 1.25 + 1e-3) and its time at most MAX_SLOWDOWN x cuBLAS's GEMM alone. Any failure (a Triton
    that cannot build it, a descriptor it refuses) is the answer "no", with the reason."""
    weight_t, weight_scale, bias = linear.fp8_weight_t, linear.fp8_weight_scale, linear.bias
    if bias is None or not weight_t.is_cuda or not weight_t.t().is_contiguous():
        return {"use": False, "why": "needs a CUDA (N, K) row-major e4m3 weight with a bias"}
    try:
        k, n = weight_t.shape
        g = torch.Generator(device=weight_t.device).manual_seed(0)
        tokens = text_tokens + image_tokens
        x = torch.randn(tokens, k, generator=g, device=weight_t.device)
        scale = x.abs().amax(dim=1, keepdim=True) / 448.0
        values = (x / scale).to(torch.float8_e4m3fn)
        first = torch.randn(1, text_tokens, n, generator=g, device=weight_t.device).to(torch.bfloat16)
        second = torch.randn(1, image_tokens, n, generator=g, device=weight_t.device).to(torch.bfloat16)
        gate = torch.randn(1, n, generator=g, device=weight_t.device).to(torch.bfloat16)
        args = (values, scale, weight_t, weight_scale, bias, first, second, gate)
        # e4m3 products are exact in fp32 (and in TF32): the scales after the sum
        exact = (values.float() @ weight_t.float()) * scale * weight_scale + bias.float()
        exact = torch.cat([first, second], dim=1).float() + gate.float()[:, None] * exact[None]

        def error(t):
            return float((t.float() - exact).norm() / exact.norm())

        fused_error, cublas_error = error(launch(*args)), error(reference_fp8_gemm_gated_residual(*args))
        fused_ms = _ms(lambda: launch(*args))
        gemm_ms = _ms(
            lambda: torch._scaled_mm(
                values, weight_t, scale, weight_scale, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
            )
        )
    except Exception as exc:  # the answer is no, with the reason; the blocks keep cuBLAS + the residual kernel
        log.warning("the fused GEMM + residual kernel is not usable: %s", exc)
        return {"use": False, "why": f"{type(exc).__name__}: {exc}"[:300]}
    right = fused_error <= 1.25 * cublas_error + 1e-3
    fast = fused_ms <= MAX_SLOWDOWN * gemm_ms
    return {
        "use": right and fast,
        "fused_ms": round(fused_ms, 4),
        "cublas_gemm_alone_ms": round(gemm_ms, 4),
        "fused_error": fused_error,
        "cublas_path_error": cublas_error,
        "why": "measured" if right and fast else ("error above the cuBLAS path's" if not right else "slower"),
    }
