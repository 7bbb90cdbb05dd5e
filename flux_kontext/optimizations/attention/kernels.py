"""The attention kernels our processor can call, and the per-engine choice between them.

q, k, v and the output are (batch, tokens, heads, head_dim):
- sdpa:  PyTorch scaled_dot_product_attention, PyTorch picks the backend (the CPU path).
- cudnn: SDPA forced to cuDNN's fused attention: close behind FA3 on Hopper (docs/FACTS.md), the GPU fallback.
- fa3:   FlashAttention 3 forward from the fa3-fwd wheel (or flash-attn-3's flash_attn_interface). diffusers'
         own `_flash_3` backend does not detect fa3-fwd, hence our processor.
- fa3_fp8: the same in FP8 (e4m3 q, k, v; FA3 also rounds the probabilities to e4m3): a lower-precision tier, not a
         drop-in kernel, so it is never picked by timing (flash_attention_3 and FLUX_FP8_ATTENTION decide). The fused
         FP8 blocks quantize q and k in their RoPE kernel and call ``fp8_call``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flux_kontext.optimizations.attention.fp8_policy import Fp8Policy
from flux_kontext.optimizations.kernels.e4m3 import quantize_per_head, quantize_static

log = logging.getLogger(__name__)

FA3_FP8 = "fa3_fp8"


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def cudnn(q, k, v):
    """SDPA's cuDNN backend, called as the aten op that ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)`` would select
    (no log-sum-exp: inference). Not the context manager: inside a compiled block dynamo records it as calls to
    private torch functions, and AOTAutograd's cache then bypasses the whole graph, so every restart rebuilt those
    blocks' graphs (about 1.3 s each on an H200) instead of loading them."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, False
    )[0]
    return out.transpose(1, 2)


def load_fa3() -> tuple[Callable | None, str]:
    """FlashAttention 3's forward, from whichever package provides it; (None, why) when none does."""
    for module_name, package in (("fa3_fwd_interface", "fa3-fwd"), ("flash_attn_interface", "flash-attn-3")):
        try:
            module = __import__(module_name)
        except Exception as exc:  # ImportError, or a wheel built for another CUDA/torch
            log.debug("FA3 from %s unavailable: %s", package, exc)
            continue
        return module.flash_attn_func, package
    return None, "no FlashAttention 3 package importable (pip install fa3-fwd, on CUDA 13 / torch >= 2.10)"


def fa3_bf16(flash_attn_func: Callable) -> Callable:
    """Some FA3 builds return (out, lse); the processor wants the output alone."""

    def kernel(q, k, v):
        result = flash_attn_func(q, k, v)
        return result[0] if isinstance(result, tuple) else result

    return kernel


def fa3_fp8(flash_attn_func: Callable) -> Callable:
    """FA3 in FP8. As a kernel it takes bf16 q, k, v and the attention module: q and k are quantized with the
    module's static scales (``fp8_qk_scale``, as the fused blocks' RoPE kernel does), per head without them; v per
    head. ``kernel.fp8_call`` takes e4m3 tensors and their descales (batch, heads) directly. The output is bf16."""

    def fp8_call(q8, k8, v8, q_descale, k_descale, v_descale):
        out = flash_attn_func(q8, k8, v8, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
        return out[0] if isinstance(out, tuple) else out

    def kernel(q, k, v, attn=None):
        v8, v_descale = quantize_per_head(v)
        scales = getattr(attn, "fp8_qk_scale", None)
        if scales is None:
            (q8, q_descale), (k8, k_descale) = quantize_per_head(q), quantize_per_head(k)
        else:
            q8, k8 = quantize_static(q, scales[0]), quantize_static(k, scales[1])
            q_descale, k_descale = (scale.expand_as(v_descale).contiguous() for scale in scales)
        return fp8_call(q8, k8, v8, q_descale, k_descale, v_descale)

    kernel.fp8_call = fp8_call
    kernel.takes_module = True
    return kernel


@dataclass
class KernelChoice:
    """The kernel every processor of one transformer calls; ``active`` may be switched for one request.

    With FA3 in FP8 active, ``policy`` keeps chosen layers (and, while ``low_noise`` is set, every layer) on the
    ``bf16`` kernel: the fastest bf16 kernel, FA3 included (fp8_policy.py)."""

    kernels: dict[str, Callable] = field(default_factory=dict)
    active: str = "sdpa"
    fallback: str = "sdpa"  # best kernel that is not FA3
    bf16: str | None = None  # the kernel of the layers and steps the FP8 policy keeps in bf16 (None: fallback)
    policy: Fp8Policy = field(default_factory=Fp8Policy)
    low_noise: bool = False  # this transformer call's sigma is below policy.bf16_below_sigma

    def __call__(self, q, k, v, attn=None):
        name = self.active
        if name == FA3_FP8 and not self.fp8_for(attn):
            name = self.bf16 or self.fallback
        kernel = self.kernels[name]
        return kernel(q, k, v, attn) if getattr(kernel, "takes_module", False) else kernel(q, k, v)

    @property
    def fp8(self) -> bool:
        """FA3 in FP8 is the tier of this request (some layers or steps may still run bf16: ``fp8_for``)."""
        return self.active == FA3_FP8

    def fp8_for(self, attn) -> bool:
        """FA3 in FP8 serves this attention module now: callers may hand it e4m3 q/k/v through ``fp8_call``."""
        if not self.fp8 or self.low_noise:
            return False
        # A per-layer bool (mark_bf16_layers), not the layer's index: compiled code guards on what it reads, and an
        # index would give each of the 57 blocks its own graph; a bool gives at most two (FP8 and bf16 layers).
        return not getattr(attn, "fp8_attention_bf16", False)

    def graph_variant(self) -> tuple[str, bool]:
        """What a captured CUDA graph holds of this choice: the active kernel and the low-noise switch. A graph
        captured with FA3 in FP8 must not replay for a request that switched it off (``Model.graph_variants``)."""
        return self.active, self.low_noise

    def fp8_call(self, *args):
        return self.kernels[FA3_FP8].fp8_call(*args)

    @contextlib.contextmanager
    def use(self, name: str):
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous
