"""cuda_graphs: CUDA graphs per transformer block and input shape, chained so that no activation is copied
between blocks.

Why per block: the first-block cache decides after block 0, on the host, whether the other 56 blocks run. A graph
of the whole transformer cannot contain that decision; a graph per block sits under the cache's hooks, so the
cache works unchanged (its decision and residual arithmetic stay eager, between replays).

How a block's graph is built and replayed (``GraphedBlock``):
- The first call with a new input signature (shapes, dtypes, strides, non-tensor arguments) runs normally: that
  is the warm run (compiled code and kernel choices are settled). The second call captures, then every later
  call replays.
- Inputs that are another graph's outputs (block i-1's) are captured as they are: at replay, block i reads the
  memory block i-1 just wrote, with no copy. Inputs shared by every block of one transformer call (the
  time embedding, RoPE cos/sin) get one static copy, refreshed once per call. Anything else is copied into the
  graph's own static input.
- Outputs are the graph's static tensors, overwritten at its next replay. Every consumer here (the next block,
  the cache's residual arithmetic, norm_out) reads them before that, within the same transformer call.

Memory: each captured shape keeps every block's outputs and one block's intermediates (sizes in BENCHMARKS.md, "CUDA
graphs"); at most FLUX_CUDA_GRAPH_MAX_SHAPES shapes are kept, and fewer when free GPU memory falls below
FLUX_CUDA_GRAPH_MIN_FREE_GIB after a capture (default: what the memory plan's largest admitted request needs, free
counted within the plan's budget): least recently used evicted, so the number of shapes kept follows the memory the
card has left (/health lists the captured shapes and the evictions). A capture that runs out of memory drops every
graph and leaves that shape without graphs from then on (/health's ``too_large_shapes``); any other capture failure
turns graphs off for good (the report says why); requests go on without.

It fills the blocks' ``graphed`` slot, above ``compiled`` (whose kernels it captures); the first-block cache's hooks
sit above it. Memory figures: BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from flux_kontext.jobs import Job
from flux_kontext.optimizations.graph_capture import CudaGraphBackend, GraphedBlock, GraphManager
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, RequestRun, skip

__all__ = ["CudaGraphBackend", "CudaGraphs", "GraphManager", "GraphedBlock", "install", "min_free_bytes"]

GIB = 2**30
DEFAULT_MIN_FREE_GIB = 20.0  # where no memory plan says what requests need (the stack built outside the engine)


def install(transformer: torch.nn.Module, slots, manager: GraphManager) -> None:
    """Put a GraphedBlock in every transformer block's ``graphed`` slot; the transformer's forward tells the manager
    where each call starts (its input shapes)."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    for index, block in enumerate(blocks):
        slots.set(block, "graphed", lambda inner, i=index: GraphedBlock(inner, manager, i))
    original_forward = transformer.forward

    def forward_with_graphs(*args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        encoder = kwargs.get("encoder_hidden_states")
        shapes = tuple(tuple(t.shape) for t in (hidden, encoder) if isinstance(t, torch.Tensor))
        manager.begin_call(shapes)
        return original_forward(*args, **kwargs)

    transformer.forward = forward_with_graphs


def min_free_bytes(setting_gib: float | None, hardware: Hardware) -> tuple[int, str]:
    """(bytes to keep free after a capture, where the number comes from): the setting, else the memory plan's
    headroom for the largest request it admits, else DEFAULT_MIN_FREE_GIB."""
    if setting_gib is not None:
        return int(setting_gib * GIB), "FLUX_CUDA_GRAPH_MIN_FREE_GIB"
    if hardware.request_headroom is not None:
        return hardware.request_headroom, "the memory plan: what its largest admitted request needs"
    return int(DEFAULT_MIN_FREE_GIB * GIB), f"{DEFAULT_MIN_FREE_GIB:g} GiB: no memory plan"


@contextlib.contextmanager
def _disabled(manager: GraphManager):
    manager.enabled = False
    try:
        yield
    finally:
        manager.enabled = True


class CudaGraphs(Optimization):
    name = "cuda_graphs"
    flag = "use_cuda_graphs"
    after = ("compile", "lora")  # captures the compiled kernels; keyed on LoRA's side path being on or off
    undoable = True
    counters = True

    def __init__(self, settings, backend_factory: Callable[[], object] = CudaGraphBackend):
        super().__init__(settings)
        self.backend_factory = backend_factory  # tests pass a CPU fake
        self.manager: GraphManager | None = None
        self._model: Model | None = None

    def decide(self, hardware: Hardware) -> Decision:
        if not hardware.is_cuda:
            return skip("CUDA graphs need a CUDA device")
        if not self.settings.cuda_graphs:
            return skip("FLUX_CUDA_GRAPHS=false")
        return APPLY

    def apply(self, model: Model) -> Outcome:
        max_shapes = self.settings.cuda_graph_max_shapes
        min_free, source = min_free_bytes(self.settings.cuda_graph_min_free_gib, model.hardware)
        budget = model.hardware.memory_budget
        self.manager = GraphManager(
            self.backend_factory(),
            max_shapes,
            self._shapes_changed,
            self._failed,
            min_free_bytes=min_free,
            budget_bytes=budget,
        )
        self.manager.variant = lambda: tuple(variant() for variant in model.graph_variants)
        install(model.pipe.transformer, model.slots, self.manager)
        self._model = model
        within = "" if budget is None else f" of the memory plan's {budget / GIB:.1f} GiB"
        return Outcome.applied(
            "one CUDA graph per transformer block and input shape, captured on a shape's second call, chained block "
            "to block without copies; works under the first-block cache (its decision stays between replays); up to "
            f"{max_shapes} shapes kept (FLUX_CUDA_GRAPH_MAX_SHAPES) while {min_free / GIB:.1f} GiB{within} stay free "
            f"({source}), least recently used evicted; per request: use_cuda_graphs",
            captured_shapes=[],
            evictions=0,
            max_shapes=max_shapes,
            min_free_gib=round(min_free / GIB, 2),
            min_free_source=source,
            budget_gib=None if budget is None else round(budget / GIB, 2),
        )

    def undo(self) -> None:
        # Not an error in itself: the stack undoes after a failed warm-up and records that failure (with its cause) in
        # the report; benches undo to take the stack down.
        self.manager.fail("undone (the stack took CUDA graphs off)", level=logging.INFO)
        self._model.slots.clear_everywhere("graphed")

    def switched_off(self):
        if self.manager is None:
            return None
        return _disabled(self.manager)

    @contextlib.contextmanager
    def request(self, job: Job, run: RequestRun):
        """Counts block calls replayed, captured and run uncaptured, whether graphs ran for this request or not."""
        if self.manager is not None:
            self.manager.reset_counts()
        with super().request(job, run):
            yield
        if self.manager is not None:
            run.counters[self.name] = self.manager.reset_counts()

    @contextlib.contextmanager
    def active(self, job: Job, run: RequestRun):
        yield
        counts = self.manager.counts
        if self.manager.failure is not None:  # a capture failed during this request: graphs are off from now on
            run.withdraw(self.name, self.flag, f"capture failed, graphs are off: {self.manager.failure}")
        elif not self.manager.capturing_allowed:
            run.withdraw(self.name, self.flag, "this input shape's graphs do not fit in the GPU memory left")
        elif counts["replayed"] + counts["captured"] == 0:  # a shape's first call runs without graphs
            run.withdraw(
                self.name,
                self.flag,
                "no block was replayed: this input shape was seen for the first time (captured on its next call)",
            )

    def _shapes_changed(self, shapes: list) -> None:
        free = self.manager.free_bytes
        self._note(
            captured_shapes=shapes,
            evictions=self.manager.evictions,
            free_gib_after_capture=None if free is None else round(free / 2**30, 2),
            too_large_shapes=[[list(part) for part in shape] for shape in self.manager.too_large],
        )

    def _failed(self, reason: str) -> None:
        self._record("failed", f"capture failed, graphs are off: {reason}")
