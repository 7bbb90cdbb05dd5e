"""float8 e4m3 arithmetic in PyTorch: static, rowwise and per-head scales (torch only: what the kernels' references
and CPUs run, and what the Triton kernels reproduce)."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_static(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t`` / ``scale`` in e4m3 (clamped to its range), in fp32; ``scale`` broadcasts (a scalar known in advance,
    or the per-row / per-head scales below)."""
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row to float8 e4m3 with its own fp32 scale, absmax / 448 (floored at 1e-12 so a zero row stays finite):
    (values, scales (..., 1)). torchao's rowwise arithmetic; this package's Triton kernels are checked
    against it."""
    scale = t.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return quantize_static(t, scale), scale


def quantize_per_head(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, tokens, heads, head_dim) to e4m3 with one scale per (batch, head), absmax / 448 as above (FA3's FP8
    descale layout): (values, descales (batch, heads) fp32)."""
    scale = t.abs().amax(dim=(1, 3)).float().clamp(min=1e-12) / E4M3_MAX
    return quantize_static(t, scale[:, None, :, None]), scale
