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
graphs"); at most FLUX_CUDA_GRAPH_MAX_SHAPES shapes are kept, least recently used evicted. A capture that fails
turns graphs off for good (the report says why); requests go on without.

It fills the blocks' ``graphed`` slot, above ``compiled`` (whose kernels it captures); the first-block cache's hooks
sit above it. Memory figures: BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from flux_kontext.jobs import Job
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, RequestRun, skip

log = logging.getLogger(__name__)


class CudaGraphBackend:
    """Captures a function into a torch.cuda.CUDAGraph; all graphs share one memory pool (replayed in order)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def new_pool(self) -> None:
        """A fresh pool: once its last graph is gone, a pool cannot be captured into again (allocator assert)."""
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # per-stream lazy state (cuBLAS workspace) exists before capture
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn()
        return graph.replay, outputs


def _signature(flat: list) -> tuple:
    return tuple(
        ("T", tuple(x.shape), x.dtype, tuple(x.stride()), x.device) if isinstance(x, torch.Tensor) else ("V", x)
        for x in flat
    )


def _flat_tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class _Captured:
    """One block's graph for one signature: its static inputs, replay function and static outputs."""

    def __init__(self, replay: Callable[[], None], inputs: list, outputs, shared: set[int]):
        self.replay = replay
        self.inputs = inputs  # per flat argument: the static tensor the graph reads, or the constant
        self.outputs = outputs
        self.shared = shared  # positions whose static tensor is the per-call shared copy


class GraphManager:
    """State shared by the blocks of one transformer: counts, shared inputs, output registry, LRU of shapes."""

    def __init__(
        self,
        backend,
        max_shapes: int = 4,
        on_shapes: Callable[[list], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ):
        self.backend = backend
        self.max_shapes = max_shapes
        self.enabled = True  # per request (use_cuda_graphs)
        self.failure: str | None = None
        self.on_shapes = on_shapes  # told the captured shapes whenever they change (for the report)
        self.on_failure = on_failure  # told why graphs were turned off
        self.counts = {"replayed": 0, "captured": 0, "eager": 0}
        self._shapes: OrderedDict[tuple, list[tuple[GraphedBlock, tuple]]] = OrderedDict()
        self._shape: tuple | None = None
        self._outputs: dict[tuple, torch.Tensor] = {}  # (data_ptr, shape, stride, dtype) of static outputs
        self._shared: dict[tuple, torch.Tensor] = {}  # per shape and source: the static copy blocks share
        self._fresh: dict[int, int] = {}  # this call: id(static copy) -> id(source tensor) it holds

    @property
    def active(self) -> bool:
        return self.enabled and self.failure is None

    # ----- per transformer call -------------------------------------------------------------------------
    def begin_call(self, shape: tuple) -> None:
        """Called at the start of each transformer call: a new set of shared inputs, LRU bookkeeping."""
        self._fresh.clear()
        self._shape = shape
        if shape in self._shapes:
            self._shapes.move_to_end(shape)

    def reset_counts(self) -> dict:
        counts, self.counts = self.counts, {"replayed": 0, "captured": 0, "eager": 0}
        return counts

    # ----- used by GraphedBlock -------------------------------------------------------------------------
    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)

    def static_input(self, position_key: tuple, source: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The tensor a graph being captured reads for ``source``; True when it is the per-call shared copy."""
        if self._key(source) in self._outputs:  # another graph's output: read it in place
            return source, False
        key = (self._shape, position_key, tuple(source.shape), source.dtype, tuple(source.stride()))
        shared = self._shared.get(key)
        if shared is None:
            shared = self._shared[key] = source.clone()
        elif self._fresh.get(id(shared)) != id(source):
            shared.copy_(source)  # captured by earlier blocks too: they read it as this call's value
        self._fresh[id(shared)] = id(source)
        return shared, True

    def refresh(self, static: torch.Tensor, source: torch.Tensor, shared: bool) -> None:
        """Make ``static`` hold ``source`` before a replay (a no-op for chained or already refreshed inputs)."""
        if static.data_ptr() == source.data_ptr():
            return
        if shared and self._fresh.get(id(static)) == id(source):
            return
        static.copy_(source)
        if shared:
            self._fresh[id(static)] = id(source)

    def register(self, block: GraphedBlock, signature: tuple, outputs) -> None:
        for t in _flat_tensors(outputs):
            self._outputs[self._key(t)] = t
        entries = self._shapes.setdefault(self._shape, [])
        entries.append((block, signature))
        self._evict_over_limit()
        self._publish()

    def _publish(self) -> None:
        """What /health shows: the input shapes (hidden, text) that hold graphs now, least recently used first."""
        if self.on_shapes is not None:
            self.on_shapes([[list(part) for part in shape] for shape in self._shapes])

    def _forget(self, shape: tuple) -> None:
        """Drop one shape's graphs, their output registrations and shared inputs; it is run, then captured anew."""
        for block, signature in self._shapes.pop(shape):
            captured = block.graphs.pop(signature, None)
            block.seen.discard(signature)
            if captured is not None:
                for t in _flat_tensors(captured.outputs):
                    self._outputs.pop(self._key(t), None)
        self._shared = {k: v for k, v in self._shared.items() if k[0] != shape}

    def _evict_over_limit(self) -> None:
        while len(self._shapes) > self.max_shapes:
            shape = next(iter(self._shapes))  # least recently used
            log.info("CUDA graphs: evicting shape %s (%d graphs)", shape, len(self._shapes[shape]))
            self._forget(shape)

    def clear(self) -> None:
        """Drop every graph; each shape is run, then captured again on its next calls."""
        for shape in list(self._shapes):
            self._forget(shape)
        self._shared.clear()  # also copies made for a capture that failed before its shape held a graph
        self.backend.new_pool()  # CUDA frees a pool with its last graph: later captures need a fresh one
        self._publish()

    def fail(self, reason: str) -> None:
        """Turn graphs off for good: drop every graph, say why in the report."""
        log.error("CUDA graphs turned off: %s", reason)
        self.failure = reason
        self.clear()
        if self.on_failure is not None:
            self.on_failure(reason)


class GraphedBlock:
    """Replaces one block's forward: runs, captures or replays it (see the module docstring)."""

    def __init__(self, forward: Callable, manager: GraphManager, index: int):
        self.forward = forward
        self.__wrapped__ = forward  # inspect.signature sees the block's own parameters
        self.manager = manager
        self.index = index
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, _Captured] = {}

    def __call__(self, *args, **kwargs):
        manager = self.manager
        if not manager.active or torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        signature = _signature(flat)
        captured = self.graphs.get(signature)
        if captured is None:
            if signature not in self.seen:
                self.seen.add(signature)
                manager.counts["eager"] += 1
                return self.forward(*args, **kwargs)
            captured = self._capture(flat, spec, signature)
            if captured is None:
                return self.forward(*args, **kwargs)
            manager.counts["captured"] += 1
        else:
            manager.counts["replayed"] += 1
            for position, (static, source) in enumerate(zip(captured.inputs, flat, strict=True)):
                if isinstance(source, torch.Tensor):
                    manager.refresh(static, source, position in captured.shared)
        captured.replay()
        return captured.outputs

    def _capture(self, flat: list, spec, signature: tuple) -> _Captured | None:
        manager = self.manager
        inputs, shared = [], set()
        for position, source in enumerate(flat):
            if isinstance(source, torch.Tensor):
                static, is_shared = manager.static_input((position,), source)
                if is_shared:
                    shared.add(position)
                inputs.append(static)
            else:
                inputs.append(source)
        args, kwargs = tree_unflatten(inputs, spec)
        try:
            replay, outputs = manager.backend.capture(lambda: self.forward(*args, **kwargs))
        except Exception as exc:  # graphs are an optimization: the request goes on without them
            manager.fail(f"block {self.index}: {type(exc).__name__}: {exc}")
            return None
        captured = _Captured(replay, inputs, outputs, shared)
        self.graphs[signature] = captured
        manager.register(self, signature, outputs)
        return captured


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
    after = ("compile",)  # captures the compiled kernels
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
        self.manager = GraphManager(self.backend_factory(), max_shapes, self._shapes_changed, self._failed)
        install(model.pipe.transformer, model.slots, self.manager)
        self._model = model
        return Outcome.applied(
            "one CUDA graph per transformer block and input shape, captured on a shape's second call, chained block "
            "to block without copies; works under the first-block cache (its decision stays between replays); up to "
            f"{max_shapes} shapes kept (FLUX_CUDA_GRAPH_MAX_SHAPES); per request: use_cuda_graphs"
        )

    def undo(self) -> None:
        self.manager.fail("undone after a failed warm-up")
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
        elif counts["replayed"] + counts["captured"] == 0:  # a shape's first call runs without graphs
            run.withdraw(
                self.name,
                self.flag,
                "no block was replayed: this input shape was seen for the first time (captured on its next call)",
            )

    def _shapes_changed(self, shapes: list) -> None:
        self._note(captured_shapes=shapes)

    def _failed(self, reason: str) -> None:
        self._record("failed", f"capture failed, graphs are off: {reason}")
