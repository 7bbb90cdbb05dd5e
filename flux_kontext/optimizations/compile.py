"""compile: regional torch.compile. Each repeated transformer block's forward compiled once (reused by all 57 of
them, fullgraph, Inductor's default mode); the VAE's encoder and decoder compiled whole.

Default mode, not max-autotune: on an FP8 FLUX block autotuning measured no faster and compiled 30x longer
(docs/FACTS.md). Regional rather than whole-model: one compile per block type instead of one graph of 57 blocks,
the same steady-state speed, a fraction of the start-up. It fills the blocks' ``compiled`` slot: whatever sits in
``body`` (diffusers' forward or our fused one) is compiled, and the CUDA graphs and the first-block cache's hooks
sit above the compiled code, so the cache's per-step decision is no graph break. VAE figures: bench/vae.py,
BENCHMARKS.md. Warm-up compiles the 1024² shapes; another resolution compiles on its first request.

With FLUX_COMPILE_CACHE_DIR, Inductor's and Triton's on-disk caches live in a directory per torch/GPU/settings
fingerprint under it (compile_cache.py), so a restart on a kept directory reuses the compiled code; the report
says which directory, its fingerprint, and whether it held compiled artifacts at start (hit) or not (cold).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

from flux_kontext.optimizations import compile_cache
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, skip

log = logging.getLogger(__name__)

# Variants per block type: static shapes, then dynamic ones after a second resolution. dynamo's limit is process
# configuration; it is only ever raised here, so another engine in the process is not slowed by it.
RECOMPILE_LIMIT = 64


class CompiledForward:
    """A forward, compiled (the ``compiled`` slot's content).

    With fullgraph, dynamo raises instead of silently running eager once a block has used up its recompile limit
    (too many distinct shapes): that block then runs eager from here on, and ``on_fallback`` says so in the report.
    """

    def __init__(self, eager: Callable, options: dict, on_fallback: Callable[[str], None]):
        self.eager = eager
        self.__wrapped__ = eager  # inspect.signature sees the block's own parameters
        self.on_fallback = on_fallback
        self.run = torch.compile(eager, fullgraph=True, options=options or None)

    def __call__(self, *args, **kwargs):
        try:
            return self.run(*args, **kwargs)
        except FailOnRecompileLimitHit as exc:  # raised before the frame runs: nothing was computed
            self.run = self.eager
            self.on_fallback(str(exc).splitlines()[0])
            return self.eager(*args, **kwargs)


class Compile(Optimization):
    name = "compile"
    # Everything that changes what a block computes comes first: the compiled graph holds it.
    after = (
        "fuse_qkv",
        "attention",
        "low_precision_gemm",
        "gelu_sigmoid_form",
        "fused_gelu_fp8",
        "fused_norm_rope",
        "lora",
    )
    undoable = True

    def __init__(self, settings):
        super().__init__(settings)
        self._model: Model | None = None
        self._vae_parts: list[torch.nn.Module] = []

    def decide(self, hardware: Hardware) -> Decision:
        if not hardware.is_cuda:
            return skip("compile is for the GPU path; the CPU demo runs eager")
        if not self.settings.compile:
            return skip("FLUX_COMPILE=false")
        return APPLY

    def inductor_options(self) -> dict:
        """Inductor configuration for this engine's compiled code only (passed per compile, not set globally).

        Multi-kernel: Inductor also generates a one-pass (persistent) version of each row reduction up to 16k wide
        and keeps whichever is faster at the first call (the FP8 row quantizations are such reductions). Off by
        default: with torch 2.11 a start that hits Inductor's on-disk cache fails to load the multi-kernel, and
        warm-up then undoes compile (BENCHMARKS.md)."""
        return {"triton.multi_kernel": 1} if self.settings.compile_multi_kernel else {}

    def apply(self, model: Model) -> Outcome:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        # Before anything compiles (the first compile is warm-up's first call): where the caches go.
        caches = compile_cache.prepare(
            self.settings.compile_cache_dir,
            self.settings,
            model.hardware,
            getattr(model.pipe.transformer, "dtype", None),
        )
        self._model = model
        transformer, vae = model.pipe.transformer, model.pipe.vae
        options = self.inductor_options()
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            model.slots.set(block, "compiled", lambda inner: CompiledForward(inner, options, self._fell_back))
        self._vae_parts = [part for part in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)) if part]
        for part in self._vae_parts:
            part.compile(options=options or None)
        parts = " and ".join(type(p).__name__ for p in self._vae_parts) or "(none found)"
        return Outcome.applied(
            "regional torch.compile of the FluxTransformerBlock and FluxSingleTransformerBlock forward (default mode, "
            f"fullgraph{', Inductor multi-kernel' if options else ''}) and of the VAE {parts}; warm-up compiles the "
            "1024² shapes, another resolution compiles on its first request; " + caches.detail,
            **caches.data(),
        )

    def undo(self) -> None:
        self._model.slots.clear_everywhere("compiled")
        for part in self._vae_parts:
            part._compiled_call_impl = None  # what Module.compile() set: the module runs eager again
        torch._dynamo.reset()

    def _fell_back(self, reason: str) -> None:
        """A block hit dynamo's recompile limit and runs eager from now on: count it in the report."""
        fallen = self._data.get("blocks_running_eager", 0) + 1
        log.error("compile: a block fell back to eager (%d so far): %s", fallen, reason)
        base = self._detail.split(" | ")[0]
        self._note(blocks_running_eager=fallen, eager_fallback_reason=reason)
        self._record(
            self._status,
            f"{base} | {fallen} block(s) now run eager: dynamo's recompile limit was hit ({reason})",
        )
