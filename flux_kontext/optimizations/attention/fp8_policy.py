"""Where FA3 in FP8 may serve: every attention layer and step, except the layers and the low-noise steps kept in bf16.

Why a policy: FP8 attention's error is not uniform. Reports on FLUX (diffusers PR #13285, xDiT PR #675) find the
first and last layers and the late, low-noise steps the sensitive ones; the start-up screen (fp8_screen.py) measures
every layer at several sigmas so the choice can follow the loaded weights. Settings: FLUX_FP8_ATTENTION_BF16_BLOCKS
(attention layers in forward order: the double blocks, then the single blocks; negative counts from the end) and
FLUX_FP8_ATTENTION_BF16_BELOW_SIGMA (steps whose sigma is below it run bf16 attention; 0: none).

The per-step switch reads the transformer's ``timestep`` argument (the pipeline passes sigma) in a forward pre-hook:
one host read of a one-element tensor per transformer call. Under torch.compile the blocks then hold two variants
(FP8 and bf16 attention); the second compiles on the first low-noise step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fp8Policy:
    bf16_layers: frozenset[int] = frozenset()
    bf16_below_sigma: float = 0.0
    ignored: tuple[int, ...] = ()  # configured indices outside the loaded transformer's layers

    @classmethod
    def from_settings(cls, settings, layers: int) -> Fp8Policy:
        """Resolve the configured indices (negative from the end) against the transformer's ``layers``."""
        chosen, ignored = set(), []
        for index in settings.fp8_attention_bf16_blocks:
            resolved = index + layers if index < 0 else index
            if 0 <= resolved < layers:
                chosen.add(resolved)
            else:
                ignored.append(index)
        if ignored:
            log.warning(
                "FLUX_FP8_ATTENTION_BF16_BLOCKS: %s outside 0..%d (or -%d..-1); ignored", ignored, layers - 1, layers
            )
        return cls(frozenset(chosen), settings.fp8_attention_bf16_below_sigma, tuple(ignored))

    def fp8_at(self, layer: int | None, sigma: float | None = None) -> bool:
        """Whether FA3 in FP8 serves ``layer`` at ``sigma`` (None: not known, e.g. a module without an index)."""
        if layer in self.bf16_layers:
            return False
        return sigma is None or sigma >= self.bf16_below_sigma

    @property
    def per_step(self) -> bool:
        return self.bf16_below_sigma > 0

    def served_error_max(self, screen: dict) -> float:
        """The largest screened layer error among the (layer, sigma) pairs this policy serves in FP8 (0 if none)."""
        served = [
            error
            for sigma, errors in zip(screen["sigmas"], screen["layer_errors"], strict=True)
            for layer, error in enumerate(errors)
            if self.fp8_at(layer, sigma)
        ]
        return max(served, default=0.0)

    def describe(self) -> dict:
        return {
            "bf16_layers": sorted(self.bf16_layers),
            "bf16_below_sigma": self.bf16_below_sigma,
            **({"ignored_indices": list(self.ignored)} if self.ignored else {}),
        }


def number_attention_layers(transformer) -> int:
    """Give each attention module its index in forward order (``fp8_layer_index``); returns how many."""
    blocks = [*getattr(transformer, "transformer_blocks", ()), *getattr(transformer, "single_transformer_blocks", ())]
    for index, block in enumerate(blocks):
        block.attn.fp8_layer_index = index
    return len(blocks)


def mark_bf16_layers(transformer, policy: Fp8Policy) -> None:
    """Give each numbered attention module ``fp8_attention_bf16``: whether the policy keeps it in bf16 (what
    ``KernelChoice.fp8_for`` reads; run after ``number_attention_layers``)."""
    blocks = [*getattr(transformer, "transformer_blocks", ()), *getattr(transformer, "single_transformer_blocks", ())]
    for block in blocks:
        block.attn.fp8_attention_bf16 = not policy.fp8_at(getattr(block.attn, "fp8_layer_index", None))


def install_sigma_switch(transformer, choice):
    """Before each transformer call, mark the choice low-noise when the step's sigma is below the policy's bound."""
    bound = choice.policy.bf16_below_sigma

    def before_forward(module, args, kwargs):
        timestep = kwargs.get("timestep")
        if timestep is not None:
            choice.low_noise = float(timestep.reshape(-1)[0]) < bound

    return transformer.register_forward_pre_hook(before_forward, with_kwargs=True)


def fp8_verdict(screen: dict, policy: Fp8Policy, mode: str, limit: float) -> dict:
    """May FA3 in FP8 serve? ``on``: yes, measured and reported; ``auto``: if every (layer, sigma) pair the policy
    serves in FP8 is within ``limit`` (the pairs it keeps in bf16 are measured too, and do not count)."""
    served = policy.served_error_max(screen)
    limit_applied = None if mode == "on" else limit
    return {"use": mode == "on" or served <= limit, "served_error_max": served, "limit": limit_applied}


def describe_screen(screen: dict, policy: Fp8Policy, verdict: dict) -> str:
    """One sentence for the report's detail: what the screen measured and what it decided."""
    sigmas = "/".join(f"{sigma:g}" for sigma in screen["sigmas"])
    worst = screen["worst"][0]
    text = (
        f"screened {screen['layers']} attention layers at sigma {sigmas} on a 1024² step: layer error "
        f"{screen['layer_error_median']:.1e} median, {screen['layer_error_max']:.1e} max (layer {worst['layer']} at "
        f"sigma {worst['sigma']:g}), transformer output {screen['output_error']:.1e}"
    )
    kept = []
    if policy.bf16_layers:
        kept.append(f"layers {sorted(policy.bf16_layers)}")
    if policy.per_step:
        kept.append(f"steps below sigma {policy.bf16_below_sigma:g}")
    if kept:
        text += f"; bf16 for {' and '.join(kept)}, FP8 elsewhere {verdict['served_error_max']:.1e} max"
    if verdict["limit"] is None:
        return text + "; no limit"
    relation = "within" if verdict["use"] else "above"
    return text + f"; {relation} FLUX_FP8_MAX_LAYER_ERROR={verdict['limit']}"
