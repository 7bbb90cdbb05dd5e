"""Jobs and results exchanged between the HTTP layer and the engine (no torch here)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

PHASES = ("text_encoding", "image_encoding", "denoising", "decoding")


class EngineNotReady(RuntimeError):
    """The engine is loading, warming up or failed; carries the reason."""


class EngineOutOfMemory(RuntimeError):
    """The GPU ran out of memory for this request; the engine itself is fine."""


class JobRejected(ValueError):
    """The request asks for something this server cannot do (a 422 with the reason)."""


class JobCancelled(RuntimeError):
    """The caller went away (disconnect or timeout); the job stopped at the next step."""


@dataclass
class Job:
    """One generation, already validated; engine-level, independent of HTTP."""

    prompt: str
    seed: int
    image: Image.Image | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    num_images: int = 1
    scheduler: str | None = None  # None: DEFAULT_SOLVER when use_dpm_solver allows it, else euler
    cache_threshold: float | None = None  # None: the server's FLUX_CACHE_THRESHOLD
    flags: dict[str, bool] = field(default_factory=dict)
    loras: tuple[tuple[str, float], ...] = ()  # (adapter name, scale); checked by the engine against what it loaded
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # Denoising progress, written by the GPU worker after each step: (steps done, steps in all); None until the first
    # step. ``on_step`` (optional) is called with the same two numbers from the worker thread: keep it quick.
    progress: tuple[int, int] | None = None
    on_step: Callable[[int, int], None] | None = field(default=None, repr=False)
    # TEST ONLY (FLUX_FAULT_INJECTION): a flux_kontext.faults.Fault, fired by the generation at its phase.
    fault: object | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Ask the engine to stop this job at its next denoising step (called from the event loop)."""
        self.cancelled.set()

    def fault_point(self, phase: str, step: int | None = None, device=None) -> None:
        """Where the generation can fail: an injected fault for this phase (tests only) fires here."""
        if self.fault is not None:
            self.fault.at(phase, step, device)

    def step_done(self, done: int, total: int) -> None:
        self.progress = (done, total)
        if self.on_step is not None:
            self.on_step(done, total)


@dataclass
class JobResult:
    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    context_size: tuple[int, int] | None
    size_source: str
    steps: int
    scheduler: str
    true_cfg: bool
    timings_ms: dict[str, float]
    optimizations: dict
    # Per optimization with counters, what it counted for this job (None where it is not loaded); the response
    # carries two of them as fields of their own (below).
    counters: dict[str, dict | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a prompt longer than the text encoder reads

    @property
    def first_block_cache(self) -> dict | None:
        """threshold, transformer calls computed and skipped"""
        return self.counters.get("first_block_cache")

    @property
    def cuda_graphs(self) -> dict | None:
        """block calls replayed, captured and run uncaptured (first sight of a shape)"""
        return self.counters.get("cuda_graphs")

    @property
    def loras(self) -> list[dict]:
        """the LoRA adapters that ran (name, scale, rank); [] when none did"""
        return list((self.counters.get("lora") or {}).get("adapters", []))
