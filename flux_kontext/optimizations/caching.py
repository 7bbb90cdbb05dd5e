"""First-block cache on current diffusers, made to work with the Kontext pipeline.

diffusers' FirstBlockCache runs the first transformer block each step and, when the relative change of its
residual is below the threshold, reuses the remaining blocks' cached residual instead of running them. Its
hooks raise "No cache context is set" unless each transformer call sits in `transformer.cache_context(...)`,
which FluxKontextPipeline does not do. So we wrap the transformer's forward (on this instance only) to enter
a context per call: "cond" for the prompt pass and "uncond" for the negative pass of true CFG, which then keep
separate cache state. Per request: the threshold (0 = never skip: the exact uncached result), a reset of the
cache, and a count of the transformer calls computed and skipped.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from flux_kontext.optimizations import OptimizationContext, Report

log = logging.getLogger(__name__)

NAME = "first_block_cache"
HEAD_HOOK = "fbc_leader_block_hook"  # diffusers' name for the hook on the first block


class FirstBlockCache:
    """Per-request control of diffusers' first-block cache on one transformer."""

    def __init__(self, transformer: torch.nn.Module, threshold: float):
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        head = transformer.transformer_blocks[0]
        self._head_hook = HookRegistry.check_if_exists_or_initialize(head).get_hook(HEAD_HOOK)
        if self._head_hook is None:
            raise RuntimeError("diffusers did not install its first-block hook on transformer_blocks[0]")
        self.transformer = transformer
        self.default_threshold = self.threshold = threshold
        self.negative: torch.Tensor | None = None
        self.computed = self.skipped = 0
        original_forward = transformer.forward

        def forward_in_cache_context(*args, **kwargs):
            negative = self.negative is not None and kwargs.get("encoder_hidden_states") is self.negative
            with transformer.cache_context("uncond" if negative else "cond"):
                output = original_forward(*args, **kwargs)
                if self._head_hook.state_manager.get_state().should_compute:
                    self.computed += 1
                else:
                    self.skipped += 1
            return output

        transformer.forward = forward_in_cache_context

    @contextlib.contextmanager
    def request(self, threshold: float | None, negative_prompt_embeds: torch.Tensor | None):
        """Fresh cache state for one request; yields self, whose counts are read after the call."""
        self.threshold = self.default_threshold if threshold is None else threshold
        # diffusers skips when the change is not above the threshold, so at 0 an unchanged residual would still
        # skip; below zero nothing does, which is what 0 promises (the exact uncached result).
        self._head_hook.threshold = self.threshold if self.threshold > 0 else -1.0
        self.negative = negative_prompt_embeds
        self.computed = self.skipped = 0
        self.transformer._reset_stateful_cache()
        try:
            yield self
        finally:
            self.negative = None
            self.transformer._reset_stateful_cache()

    def summary(self) -> dict:
        return {"threshold": self.threshold, "computed": self.computed, "skipped": self.skipped}


def apply(pipe, context: OptimizationContext) -> Report:
    """Install the cache when FLUX_FIRST_BLOCK_CACHE is on; the engine drives it per request."""
    settings = context.settings
    if not settings.first_block_cache:
        return Report(NAME, "skipped", "FLUX_FIRST_BLOCK_CACHE=false")
    pipe.first_block_cache = FirstBlockCache(pipe.transformer, settings.cache_threshold)
    return Report(
        NAME,
        "applied",
        f"diffusers FirstBlockCache, residual threshold {settings.cache_threshold} (per request: cache_threshold; "
        "0 never skips); cond and true-CFG uncond passes keep separate state; skips are reported per request",
    )
