"""Triton kernels for the memory-bound work between the FP8 GEMMs of a FLUX block, each with its PyTorch reference.

Each kernel runs one program per token row (rope.QK_ROWS_PER_PROGRAM: measured best at one), loads the row once,
keeps it in registers and writes its result once; except the single blocks' GELU, whose 15,360-wide rows are read in
tiles, twice (absmax, then quantization), so that many rows are in flight per SM. The GELU kernels issue few
instructions per element (#18): rows in power-of-two pieces or tiles, no padded lane, approximate exp2 / reciprocal
(gelu.GELU_KERNEL; the Triton code in triton_rows.py):
- ``gelu_fp8``:   [attention output | GELU(MLP)] quantized rowwise to e4m3, the input of proj_out / ff.net[2].
- ``ln_mod_fp8``: LayerNorm (no affine) + AdaLN modulation x·(1 + scale) + shift, quantized rowwise to e4m3: the
                  input of the QKV / MLP GEMMs. Reads its rows from two tensors (text, image) when the block
                  concatenates them, so the concatenation is never written.
- ``residual_ln_mod_fp8``: the double blocks' gated residual x + gate·(attention output projection), written as the
                  new hidden states, and ``ln_mod_fp8`` of it, in one pass over the rows (#18).
- ``rows_fp8``:   plain rowwise e4m3: the double blocks' joint attention output, the input of to_add_out and to_out,
                  in one launch for both streams.
- ``fp8_gemm_gated_residual``: not a row kernel: the single blocks' proj_out FP8 GEMM with cat(text, image) +
                  gate · output in its epilogue (gemm_residual.py; a custom op, used where measured at start).
- ``qk_norm_rope``: the fused QKV GEMM's output split per head, RMSNorm on q and k, RoPE on q and k, written as
                  contiguous (batch, tokens, heads, head_dim) q, k, v for the attention kernel; two sources (text,
                  image rows with their own norm weights) are written as one concatenated sequence.
- ``qk_norm_rope_fp8``: the same for FA3 in FP8: q and k written in e4m3 with static scales, v's per-head absmax
                  taken on the way (atomic max), then a second kernel (``v_fp8_kernel``) writes v in e4m3 straight
                  from the QKV rows, with FA3's descales.

Under compile Inductor fuses the same work into reduction kernels that pass over each row twice (bench/ profiles:
1.5-3x the bytes' time). Arithmetic follows the unfused path (fp32 inside, the bf16 roundings diffusers makes,
torchao's rowwise scale: absmax / 448 floored at 1e-12); each ``reference_*`` is that arithmetic in PyTorch, what
CPUs run, and what the GPU check (bench/fused_blocks.py) compares the kernels with.

Layout: ``e4m3`` (the e4m3 quantizers, torch only), ``gelu``, ``layer_norm``, ``rope``: each kernel next to its
reference, its Triton code inside the module's ``build(launch)`` or, for the GELU and LayerNorm kernels (helpers
Inductor must find as module globals), in ``triton_rows`` / ``triton_ln_rows`` which only ``build`` imports (so
importing this package never imports triton).
The functions here dispatch on the tensor alone: the Triton op on CUDA bf16 tensors, the reference otherwise.

The kernels are registered as torch ops (``torch.library.triton_op``) by ``ops()``, once per process. Call it at load
time, before torch.compile traces the dispatchers, so the registration never happens inside compiled code and
torch.compile traces the ops as opaque calls; after that the dispatchers' own ``ops()`` call only returns the cache.
"""

from __future__ import annotations

import types

import torch

from flux_kontext.optimizations.kernels import gelu, layer_norm, rope
from flux_kontext.optimizations.kernels.e4m3 import E4M3_MAX, quantize_per_head, quantize_rowwise_fp8, quantize_static
from flux_kontext.optimizations.kernels.gelu import reference_gelu_fp8
from flux_kontext.optimizations.kernels.gemm_residual import fp8_gemm_gated_residual
from flux_kontext.optimizations.kernels.layer_norm import (
    reference_ln_mod_fp8,
    reference_residual_ln_mod_fp8,
    reference_rows_fp8,
)
from flux_kontext.optimizations.kernels.rope import reference_qk_norm_rope, reference_qk_norm_rope_fp8

__all__ = [
    "E4M3_MAX",
    "fp8_gemm_gated_residual",
    "gelu_fp8",
    "ln_mod_fp8",
    "ops",
    "qk_norm_rope",
    "qk_norm_rope_fp8",
    "quantize_per_head",
    "quantize_rowwise_fp8",
    "quantize_static",
    "residual_ln_mod_fp8",
    "rows_fp8",
    "reference_gelu_fp8",
    "reference_ln_mod_fp8",
    "reference_residual_ln_mod_fp8",
    "reference_rows_fp8",
    "reference_qk_norm_rope",
    "reference_qk_norm_rope_fp8",
]

# The registered ops, built by the first ops() call. A cache of the torch.library registration, which is process-wide
# by nature (an op name registers once per process), not a switch: whether a kernel runs depends on the tensor only.
_OPS = None


def ops() -> types.SimpleNamespace:
    """Build the Triton kernels and register them as torch ops (traceable by torch.compile), once per process (GPU
    only: imports triton): the ops gelu_fp8, ln_mod_fp8, residual_ln_mod_fp8, rows_fp8, qk_norm_rope,
    qk_norm_rope_fp8 and their launchers launch_* (``raw=True``: the bare kernel, for benchmarks)."""
    global _OPS
    if _OPS is None:
        from torch.library import wrap_triton

        def launch(kernel, raw: bool):
            """The kernel as torch ops call it (wrap_triton: traceable), or raw (benchmarks: no eager op overhead)."""
            return kernel if raw else wrap_triton(kernel)

        _OPS = types.SimpleNamespace(**gelu.build(launch), **layer_norm.build(launch), **rope.build(launch))
    return _OPS


def _on_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype == torch.bfloat16


def gelu_fp8(attn: torch.Tensor | None, mlp: torch.Tensor, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[attn | GELU(mlp)] quantized rowwise: values (rows, A+F), scales (rows, 1); the kernel on the GPU. With
    ``extra``, values is (rows, A+F + extra), its last columns for the caller to write (LoRA's x_aug)."""
    if attn is not None:
        attn = attn.reshape(*mlp.shape[:-1], attn.shape[-1])  # (batch, tokens, C) next to (rows, F) GEMM outputs
    if not _on_kernel(mlp):
        values, scale = gelu.reference_gelu_fp8(attn, mlp, extra)
        return values.reshape(-1, values.shape[-1]), scale.reshape(-1, 1)
    has_attn = attn is not None
    return ops().gelu_fp8(attn.contiguous() if has_attn else mlp, mlp.contiguous(), has_attn, extra)


def ln_mod_fp8(first, second, shift, scale, eps: float, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Modulated LayerNorm of cat(first, second) (batch, tokens, C), quantized rowwise: (values, scales); with
    ``extra``, values is (rows, C + extra), its last columns for the caller to write (LoRA's x_aug)."""
    if not _on_kernel(first):
        return layer_norm.reference_ln_mod_fp8(first, second, shift, scale, eps, extra)
    has_second = second is not None
    first = first if first.stride(-1) == 1 else first.contiguous()
    second = (second if second.stride(-1) == 1 else second.contiguous()) if has_second else first
    return ops().ln_mod_fp8(first, second, shift, scale, has_second, eps, extra)


def residual_ln_mod_fp8(x, y, gate, shift, scale, eps: float, extra: int = 0):
    """The gated residual x + gate·y (batch, tokens, C), then its modulated LayerNorm quantized rowwise, in one pass:
    (new x, values, scales); ``extra`` as ln_mod_fp8's (LoRA's x_aug columns after each row)."""
    y = y.reshape(x.shape)  # the output projection's (rows, C) as (batch, tokens, C)
    if not _on_kernel(x):
        return layer_norm.reference_residual_ln_mod_fp8(x, y, gate, shift, scale, eps, extra)
    x, y = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, y))
    return ops().residual_ln_mod_fp8(x, y, gate, shift, scale, eps, extra)


def rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) rows quantized to e4m3 with one scale each: (values (rows, C), scales (rows, 1))."""
    if not _on_kernel(x):
        return layer_norm.reference_rows_fp8(x)
    return ops().rows_fp8(x.reshape(-1, x.shape[-1]).contiguous())


def qk_norm_rope(first, second, norms_first, norms_second, rotary, heads: int, eps: float):
    """q, k, v (batch, tokens, heads, head_dim) from QKV rows: RMSNorm and RoPE on q and k; see the reference."""
    if not _on_kernel(first):
        return rope.reference_qk_norm_rope(first, second, norms_first, norms_second, rotary, heads, eps)
    return ops().qk_norm_rope(*rope._qk_args(first, second, norms_first, norms_second, rotary), heads, eps)


def qk_norm_rope_fp8(first, second, norms_first, norms_second, rotary, heads: int, eps: float, fp8_scales):
    """As qk_norm_rope, for FA3 in FP8: q, k in e4m3 with the static ``fp8_scales`` (attention.fp8_qk_scales), v in
    e4m3 with per-head scales; returns (q, k, v, v descales (batch, heads))."""
    if not _on_kernel(first):
        return rope.reference_qk_norm_rope_fp8(first, second, norms_first, norms_second, rotary, heads, eps, fp8_scales)
    first_, second_, *weights, cos, sin, has_second = rope._qk_args(first, second, norms_first, norms_second, rotary)
    return ops().qk_norm_rope_fp8(first_, second_, *weights, cos, sin, fp8_scales, has_second, heads, eps)
