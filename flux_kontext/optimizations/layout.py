"""Weight and memory layout: fused Q/K/V projections, channels-last VAE."""

from __future__ import annotations

import torch

from flux_kontext.optimizations import OptimizationContext, Report


def apply_fuse_qkv(pipe, context: OptimizationContext) -> Report:
    """One (q|k|v) GEMM instead of three, in the transformer's attention and the VAE's mid-block attention."""
    if not context.settings.fuse_qkv:
        return Report("fuse_qkv", "skipped", "FLUX_FUSE_QKV=false")
    pipe.transformer.fuse_qkv_projections()
    fused = [m for m in pipe.transformer.modules() if getattr(m, "fused_projections", False)]
    dropped = sum(_drop_unfused(m) for m in fused)
    parts = [f"transformer: {len(fused)} attention modules ({dropped / 1e9:.2f}B unfused weights freed)"]
    try:
        pipe.vae.fuse_qkv_projections()
        parts.append("VAE: mid-block attention")
    except (AttributeError, ValueError) as exc:  # a VAE class without the API keeps working unfused
        parts.append(f"VAE not fused ({exc})")
    return Report("fuse_qkv", "applied", "; ".join(parts))


UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def _drop_unfused(attn: torch.nn.Module) -> int:
    """diffusers keeps the separate q/k/v layers after fusing; serving never calls them (2.1B parameters on FLUX)."""
    freed = 0
    for name in UNFUSED:
        layer = getattr(attn, name, None)
        if isinstance(layer, torch.nn.Linear):
            freed += sum(p.numel() for p in layer.parameters())
            setattr(attn, name, None)
    return freed


def apply_channels_last(pipe, context: OptimizationContext) -> Report:
    """Channels-last VAE, only when asked: our eager VAE decode was slower with it (86 vs 130 ms, docs/FACTS.md)."""
    if context.device_type != "cuda":
        return Report("channels_last", "skipped", "a GPU layout; the CPU demo keeps the default")
    if not context.settings.channels_last:
        return Report(
            "channels_last", "skipped", "measured slower for the VAE decode on H100 (FLUX_CHANNELS_LAST=true to force)"
        )
    pipe.vae.to(memory_format=torch.channels_last)
    return Report("channels_last", "applied", "VAE weights in channels-last (FLUX_CHANNELS_LAST=true)")
