"""Our FLUX attention processor (joint text/image, RMS-normed q/k, RoPE) calling a KernelChoice, and the static FP8
scales of q and k that FA3 in FP8 and the fused blocks' RoPE kernel use."""

from __future__ import annotations

import torch

from flux_kontext.optimizations.attention.kernels import KernelChoice
from flux_kontext.optimizations.kernels.e4m3 import E4M3_MAX


class KernelFluxAttnProcessor:
    """FLUX attention calling ``choice`` for the attention itself."""

    def __init__(self, choice: KernelChoice):
        self.choice = choice

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("FLUX.1-Kontext attention takes no mask")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.choice(q, k, v, attn).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes(
            [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def install(transformer, choice: KernelChoice) -> None:
    transformer.set_attn_processor(KernelFluxAttnProcessor(choice))


def kernel_choice(attn) -> KernelChoice | None:
    """The kernel choice of an attention module running our processor, else None."""
    processor = getattr(attn, "processor", None)
    return processor.choice if isinstance(processor, KernelFluxAttnProcessor) else None


def fp8_qk_scales(norm_weights_q, norm_weights_k, head_dim: int) -> torch.Tensor:
    """Static e4m3 scales (q, k) for RMS-normed, rotated q and k: after RMSNorm a head's squares sum to head_dim, so
    no element exceeds sqrt(head_dim) · max|weight|, and RoPE turns pairs without changing their length. The bound
    holds for every input; e4m3's relative precision is the same across its normal range, so a loose bound costs
    only values below 2^-6 of it."""
    bounds = [max(float(w.detach().abs().max()) for w in weights) for weights in (norm_weights_q, norm_weights_k)]
    return torch.tensor(bounds, dtype=torch.float32, device=norm_weights_q[0].device) * head_dim**0.5 / E4M3_MAX


def register_fp8_qk_scales(transformer) -> int:
    """Give every attention module with RMS-normed q/k its static FP8 scales (buffer ``fp8_qk_scale``; the text
    stream's norms count too); returns how many."""
    count = 0
    for module in transformer.modules():
        if getattr(module, "norm_q", None) is None or getattr(module.norm_q, "weight", None) is None:
            continue
        added = getattr(module, "norm_added_q", None) is not None
        weights_q = [module.norm_q.weight, *([module.norm_added_q.weight] if added else [])]
        weights_k = [module.norm_k.weight, *([module.norm_added_k.weight] if added else [])]
        scales = fp8_qk_scales(weights_q, weights_k, module.head_dim)
        module.register_buffer("fp8_qk_scale", scales, persistent=False)
        count += 1
    return count
