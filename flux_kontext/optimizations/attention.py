"""Attention kernel selection. Today: PyTorch SDPA, which picks flash/cuDNN/efficient/math per call."""

from __future__ import annotations

import torch

from flux_kontext.optimizations import OptimizationContext, Report

NAME = "attention"


def apply(pipe, context: OptimizationContext) -> Report:
    """Report the attention path the transformer uses; diffusers' default processor calls F.sdpa."""
    if context.device_type == "cuda":
        backends = [
            name
            for name, enabled in (
                ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                ("flash", torch.backends.cuda.flash_sdp_enabled()),
                ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                ("math", torch.backends.cuda.math_sdp_enabled()),
            )
            if enabled
        ]
        detail = f"PyTorch scaled_dot_product_attention; PyTorch picks among {', '.join(backends)} per call"
    else:
        detail = "PyTorch scaled_dot_product_attention on CPU"
    return Report(NAME, "applied", detail)
