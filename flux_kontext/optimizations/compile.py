"""Regional torch.compile: each repeated transformer block compiled once, reused by all 57 of them."""

from __future__ import annotations

import torch

from flux_kontext.optimizations import OptimizationContext, Report


def apply(pipe, context: OptimizationContext) -> Report:
    """Compile the 19 double and 38 single blocks (fullgraph, Inductor's default mode).

    Default mode, not max-autotune: on an FP8 FLUX block autotuning measured no faster (1.95 vs 1.955 ms) and
    took 280 s instead of 9 s to compile (docs/FACTS.md). Regional rather than whole-model: one compile per block
    type instead of one graph of 57 blocks, the same steady-state speed, a fraction of the start-up.
    """
    if context.device_type != "cuda":
        return Report("compile", "skipped", "compile is for the GPU path; the CPU demo runs eager")
    if not context.settings.compile:
        return Report("compile", "skipped", "FLUX_COMPILE=false")
    # The first-block cache decides per step in Python (a graph break in the first block): fullgraph only without it.
    fullgraph = getattr(pipe, "first_block_cache", None) is None
    # Variants per block: shapes (static, then dynamic) x attention kernel x cache context and decision.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    pipe.transformer.compile_repeated_blocks(fullgraph=fullgraph)
    return Report(
        "compile",
        "applied",
        undo=lambda: _uncompile(pipe.transformer),
        detail=f"regional torch.compile of FluxTransformerBlock and FluxSingleTransformerBlock (default mode, "
        f"fullgraph={fullgraph}); warm-up compiles the 1024² shapes, another resolution compiles on its first request",
    )


def _uncompile(transformer: torch.nn.Module) -> None:
    """Back to eager blocks (what Module.compile() set is cleared) and drop the compiled code."""
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()
