"""fuse_qkv: one (q|k|v) GEMM instead of three, in the transformer's attention and the VAE's mid-block attention.

First in the stack: quantization then quantizes the fused weight, and our attention processor reads ``to_qkv``.
"""

from __future__ import annotations

import torch

from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, skip

UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


class FuseQkv(Optimization):
    name = "fuse_qkv"

    def decide(self, hardware: Hardware) -> Decision:
        return APPLY if self.settings.fuse_qkv else skip("FLUX_FUSE_QKV=false")

    def apply(self, model: Model) -> Outcome:
        pipe = model.pipe
        pipe.transformer.fuse_qkv_projections()
        fused = [m for m in pipe.transformer.modules() if getattr(m, "fused_projections", False)]
        dropped = sum(_drop_unfused(m) for m in fused)
        parts = [f"transformer: {len(fused)} attention modules ({dropped / 1e9:.2f}B unfused weights freed)"]
        try:
            pipe.vae.fuse_qkv_projections()
            parts.append("VAE: mid-block attention")
        except (AttributeError, ValueError) as exc:  # a VAE class without the API keeps working unfused
            parts.append(f"VAE not fused ({exc})")
        return Outcome.applied("; ".join(parts))


def _drop_unfused(attn: torch.nn.Module) -> int:
    """diffusers keeps the separate q/k/v layers after fusing; serving never calls them (2.1B parameters on FLUX)."""
    freed = 0
    for name in UNFUSED:
        layer = getattr(attn, name, None)
        if isinstance(layer, torch.nn.Linear):
            freed += sum(p.numel() for p in layer.parameters())
            setattr(attn, name, None)
    return freed
