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

    def at_load(self, hardware: Hardware):
        """Fuse each transformer block as the loader materializes it (before it is quantized); ``apply`` then
        reports it and fuses the VAE."""
        self._dropped_at_load = 0

        def fuse_block(block: torch.nn.Module, _prefix: str) -> None:
            self._dropped_at_load += _fuse(block)

        return fuse_block

    def apply(self, model: Model) -> Outcome:
        pipe = model.pipe
        at_load = getattr(self, "_dropped_at_load", None)
        dropped = at_load if at_load is not None else _fuse(pipe.transformer)
        fused = [m for m in pipe.transformer.modules() if getattr(m, "fused_projections", False)]
        where = "fused at load, block by block; " if at_load is not None else ""
        parts = [f"transformer: {where}{len(fused)} attention modules ({dropped / 1e9:.2f}B unfused weights freed)"]
        try:
            pipe.vae.fuse_qkv_projections()
            parts.append("VAE: mid-block attention")
        except (AttributeError, ValueError) as exc:  # a VAE class without the API keeps working unfused
            parts.append(f"VAE not fused ({exc})")
        return Outcome.applied("; ".join(parts))


def _fuse(root: torch.nn.Module) -> int:
    """Fuse every attention module under ``root`` (diffusers' own fusion); returns the unfused parameters freed."""
    from diffusers.models.attention import AttentionModuleMixin

    fused = 0
    for module in root.modules():
        if isinstance(module, AttentionModuleMixin) and module._supports_qkv_fusion:
            module.fuse_projections()
            fused += _drop_unfused(module) if getattr(module, "fused_projections", False) else 0
    return fused


def _drop_unfused(attn: torch.nn.Module) -> int:
    """diffusers keeps the separate q/k/v layers after fusing; serving never calls them (2.1B parameters on FLUX)."""
    freed = 0
    for name in UNFUSED:
        layer = getattr(attn, name, None)
        if isinstance(layer, torch.nn.Linear):
            freed += sum(p.numel() for p in layer.parameters())
            setattr(attn, name, None)
    return freed
