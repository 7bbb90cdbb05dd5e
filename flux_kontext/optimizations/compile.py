"""Regional torch.compile: each repeated transformer block's forward compiled once, reused by all 57 of them;
the VAE's encoder and decoder compiled whole."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

from flux_kontext.optimizations import OptimizationContext, Report

log = logging.getLogger(__name__)


class CompiledForward:
    """A block's forward, compiled; ``undo`` puts the eager one back in place (the wrappers above keep this).

    With fullgraph, dynamo raises instead of silently running eager once a block has used up its recompile limit
    (too many distinct shapes): that block then runs eager from here on, and ``on_fallback`` says so in the report.
    """

    def __init__(self, eager: Callable, on_fallback: Callable[[str], None] | None = None):
        self.eager = eager
        self.__wrapped__ = eager  # inspect.signature sees the block's own parameters
        self.on_fallback = on_fallback
        self.run = torch.compile(eager, fullgraph=True)

    def __call__(self, *args, **kwargs):
        try:
            return self.run(*args, **kwargs)
        except FailOnRecompileLimitHit as exc:  # raised before the frame runs: nothing was computed
            self.run = self.eager
            if self.on_fallback is not None:
                self.on_fallback(str(exc).splitlines()[0])
            return self.eager(*args, **kwargs)

    def undo(self) -> None:
        self.run = self.eager


def _fallback_recorder(report: Report) -> Callable[[str], None]:
    """Counts blocks that fell back to eager and writes it into the compile report (/health, each response)."""
    base_detail = report.detail

    def record(reason: str) -> None:
        fallen = report.data.get("blocks_running_eager", 0) + 1
        report.data["blocks_running_eager"] = fallen
        report.data["eager_fallback_reason"] = reason
        log.error("compile: a block fell back to eager (%d so far): %s", fallen, reason)
        report.detail = f"{base_detail} | {fallen} block(s) now run eager: dynamo's recompile limit was hit ({reason})"

    return record


def apply(pipe, context: OptimizationContext) -> Report:
    """Compile the forward of the 19 double and 38 single blocks (fullgraph, Inductor's default mode), and the VAE.

    Default mode, not max-autotune: on an FP8 FLUX block autotuning measured no faster (1.95 vs 1.955 ms) and
    took 280 s instead of 9 s to compile (docs/FACTS.md). Regional rather than whole-model: one compile per block
    type instead of one graph of 57 blocks, the same steady-state speed, a fraction of the start-up.
    The block's forward is compiled (not its __call__), so the CUDA graphs and the first-block cache's hooks sit
    above the compiled code: the cache's per-step decision is no graph break, and every block is one full graph.
    The VAE's encoder and decoder: 1024² decode 90 -> 38 ms, encode 50 -> 21 ms on H100 (bench/vae.py).
    """
    if context.device_type != "cuda":
        return Report("compile", "skipped", "compile is for the GPU path; the CPU demo runs eager")
    if not context.settings.compile:
        return Report("compile", "skipped", "FLUX_COMPILE=false")
    # Variants per block type: static shapes, then dynamic ones after a second resolution.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Multi-kernel: Inductor also generates a one-pass (persistent) version of each row reduction up to 16k wide and
    # keeps whichever is faster at the first call. The FP8 row quantizations (3,072- to 15,360-wide rows) are such
    # reductions: 1.6-2% faster steps on H100 after the GELU form (bench/cuda_graph_probe.py). Off by default: with
    # torch 2.11 a start that hits Inductor's on-disk cache fails to load the multi-kernel (Triton's JITFunction
    # has no hash lock after deserialization), and warm-up then undoes compile. Global Inductor config.
    multi_kernel = context.settings.compile_multi_kernel
    torch._inductor.config.triton.multi_kernel = 1 if multi_kernel else 0
    transformer = pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    vae_parts = [part for part in (getattr(pipe.vae, "encoder", None), getattr(pipe.vae, "decoder", None)) if part]
    compiled: list[CompiledForward] = []

    def undo() -> None:
        for forward in compiled:
            forward.undo()
        for part in vae_parts:
            part._compiled_call_impl = None  # what Module.compile() set
        torch._dynamo.reset()

    report = Report(
        "compile",
        "applied",
        undo=undo,
        detail="regional torch.compile of the FluxTransformerBlock and FluxSingleTransformerBlock forward (default "
        f"mode, fullgraph{', Inductor multi-kernel' if multi_kernel else ''}) and of the VAE "
        f"{' and '.join(type(p).__name__ for p in vae_parts) or '(none found)'}; "
        "warm-up compiles the 1024² shapes, another resolution compiles on its first request",
    )
    on_fallback = _fallback_recorder(report)
    for block in blocks:
        block.forward = CompiledForward(block.forward, on_fallback)
        compiled.append(block.forward)
    for part in vae_parts:
        part.compile()
    return report
