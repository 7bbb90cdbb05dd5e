"""first_block_cache: diffusers' first-block cache on current diffusers, made to work with the Kontext pipeline.

diffusers' FirstBlockCache runs the first transformer block each step and, when the relative change of its
residual is below the threshold, reuses the remaining blocks' cached residual instead of running them. Its
hooks raise "No cache context is set" unless each transformer call sits in `transformer.cache_context(...)`,
which FluxKontextPipeline does not do. So we wrap the transformer's forward (on this instance only) to enter
a context per call: "cond" for the prompt pass and "uncond" for the negative pass of true CFG, which then keep
separate cache state. Per request: the threshold (0 = never skip: the exact uncached result), a reset of the
cache, and a count of the transformer calls computed and skipped.

Its hooks sit in diffusers' hook registry, above every forward slot (body -> compiled -> graphed): its per-step
decision runs on the host, between graph replays and outside compiled code (no graph break). Last of the
transformer optimizations for that reason.

That decision reads a GPU value (``.item()``): one synchronization per transformer call, after which the GPU waits
for the host to launch the next block. A request whose threshold cannot skip (0, the exact result, the stage table's
setting) does not need it: there the decision is "compute" without looking, so nothing in the denoising loop
synchronizes and the host queues whole steps ahead (BENCHMARKS.md, #18, "host").
"""

from __future__ import annotations

import contextlib
import logging

import torch

from flux_kontext.jobs import Job
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, RequestRun, skip

log = logging.getLogger(__name__)

HEAD_HOOK = "fbc_leader_block_hook"  # diffusers' name for the hook on the first block


class FirstBlockCacheControl:
    """Per-request control of diffusers' first-block cache on one transformer. ``reduce_sum``: under context
    parallelism, the sum over ranks, which makes the skip decision the whole sequence's (the same on every rank)."""

    def __init__(self, transformer: torch.nn.Module, threshold: float, reduce_sum=None):
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        head = transformer.transformer_blocks[0]
        self._head_hook = HookRegistry.check_if_exists_or_initialize(head).get_hook(HEAD_HOOK)
        if self._head_hook is None:
            raise RuntimeError("diffusers did not install its first-block hook on transformer_blocks[0]")
        # diffusers' decision (a bound method), or under context parallelism the whole sequence's
        self._decide = self._head_hook._should_compute_remaining_blocks
        if reduce_sum is not None:
            self._decide = _global_decision(self._head_hook, reduce_sum)
        self._head_hook._should_compute_remaining_blocks = self._decide
        self.transformer = transformer
        self.default_threshold = self.threshold = threshold
        self.run: RequestRun | None = None
        self.computed = self.skipped = 0
        original_forward = transformer.forward

        def forward_in_cache_context(*args, **kwargs):
            negative = self.run is not None and self.run.negative_prompt_embeds is not None
            negative = negative and kwargs.get("encoder_hidden_states") is self.run.negative_prompt_embeds
            with transformer.cache_context("uncond" if negative else "cond"):
                output = original_forward(*args, **kwargs)
                if self._head_hook.state_manager.get_state().should_compute:
                    self.computed += 1
                else:
                    self.skipped += 1
            return output

        transformer.forward = forward_in_cache_context

    @contextlib.contextmanager
    def request(self, threshold: float | None, run: RequestRun):
        """Fresh cache state for one request; the counts are in ``summary()`` afterwards."""
        self.threshold = self.default_threshold if threshold is None else threshold
        # diffusers skips when the change is not above the threshold, so at 0 an unchanged residual would still
        # skip; below zero nothing does, which is what 0 promises (the exact uncached result).
        self._head_hook.threshold = self.threshold if self.threshold > 0 else -1.0
        # Nothing can skip at 0: decide without reading the GPU (no synchronization per step)
        self._head_hook._should_compute_remaining_blocks = self._decide if self.threshold > 0 else _compute
        self.run = run
        self.computed = self.skipped = 0
        self.transformer._reset_stateful_cache()
        try:
            yield self
        finally:
            self.run = None
            self.transformer._reset_stateful_cache()

    def summary(self) -> dict:
        return {"threshold": self.threshold, "computed": self.computed, "skipped": self.skipped}


def _compute(_residual: torch.Tensor) -> bool:
    """The decision where nothing may skip: compute the remaining blocks, without reading the residual."""
    return True


def _global_decision(hook, reduce_sum):
    """diffusers' decision (mean |residual change| / mean |previous residual| above the threshold) over every rank's
    tokens: the ratio of the summed numerators and denominators (equal counts on both sides)."""

    def should_compute(residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:
            return True
        sums = reduce_sum(torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).float())
        return float(sums[0] / sums[1]) > hook.threshold

    return should_compute


class FirstBlockCache(Optimization):
    name = "first_block_cache"
    # Its hooks wrap whatever the blocks' forward slots hold; its forward wrapper sits above context_parallel's.
    after = ("cuda_graphs", "compile", "context_parallel")
    counters = True

    def __init__(self, settings):
        super().__init__(settings)
        self.control: FirstBlockCacheControl | None = None

    def decide(self, hardware: Hardware) -> Decision:
        return APPLY if self.settings.first_block_cache else skip("FLUX_FIRST_BLOCK_CACHE=false")

    def apply(self, model: Model) -> Outcome:
        threshold = self.settings.cache_threshold
        parallel = model.earlier.get("context_parallel")
        reduce_sum = parallel.all_reduce_sum if parallel is not None else None
        self.control = FirstBlockCacheControl(model.pipe.transformer, threshold, reduce_sum)
        return Outcome.applied(
            f"diffusers FirstBlockCache, residual threshold {threshold} (per request: cache_threshold; "
            "0 never skips); cond and true-CFG uncond passes keep separate state; skips are reported per request"
        )

    @contextlib.contextmanager
    def active(self, job: Job, run: RequestRun):
        with self.control.request(job.cache_threshold, run) as control:
            try:
                yield
            finally:
                run.counters[self.name] = control.summary()
