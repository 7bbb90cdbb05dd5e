"""The capture-and-replay machinery behind cuda_graphs: one torch.cuda.CUDAGraph per block and input signature,
chained block to block without copies (how and why: cuda_graphs.py's docstring)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)


class CudaGraphBackend:
    """Captures a function into a torch.cuda.CUDAGraph; all graphs share one memory pool (replayed in order)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def free_bytes() -> int:
        """Device memory a request could still use: free on the device plus what the caching allocator holds unused."""
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()

    @staticmethod
    def allocated_bytes() -> int:
        """What this process's tensors (graph pools' included) hold: counted against a memory plan's budget."""
        return torch.cuda.memory_allocated()

    @staticmethod
    def release_memory() -> None:
        """The dropped graphs' pool back to the device (the caching allocator keeps freed segments otherwise)."""
        torch.cuda.empty_cache()

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
        min_free_bytes: int = 0,
        budget_bytes: int | None = None,
    ):
        self.backend = backend
        self.max_shapes = max_shapes
        # Graphs hold memory (every block's outputs per shape): older shapes go when less than this is left free.
        self.min_free_bytes = min_free_bytes
        # The memory plan's budget: free is also counted within it (a process capped below the card's memory, or a
        # GPU shared with others, sees more free on the device than it may use).
        self.budget_bytes = budget_bytes
        self.free_bytes: int | None = None  # measured after the last capture (None: the backend cannot say)
        self.enabled = True  # per request (use_cuda_graphs)
        self.failure: str | None = None
        self.evictions = 0  # shapes dropped by the LRU since start (/health, /metrics)
        self.on_shapes = on_shapes  # told the captured shapes whenever they change (for the report)
        self.on_failure = on_failure  # told why graphs were turned off
        self.counts = {"replayed": 0, "captured": 0, "eager": 0}
        # What a block computes besides its arguments (LoRA's side path on or off): part of every graph's key.
        self.variant: Callable[[], tuple] = tuple
        self._shapes: OrderedDict[tuple, list[tuple[GraphedBlock, tuple]]] = OrderedDict()
        self._shape: tuple | None = None
        self._outputs: dict[tuple, torch.Tensor] = {}  # (data_ptr, shape, stride, dtype) of static outputs
        self._shared: dict[tuple, torch.Tensor] = {}  # per shape and source: the static copy blocks share
        self._fresh: dict[int, int] = {}  # this call: id(static copy) -> id(source tensor) it holds
        # Shapes whose capture ran out of memory: they run without graphs from then on (/health lists them).
        self.too_large: list[tuple] = []

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

    @property
    def capturing_allowed(self) -> bool:
        """False for a shape whose capture ran out of memory before: it runs without graphs."""
        return self._shape not in self.too_large

    def out_of_memory(self, block_index: int, why: str) -> None:
        """A capture ran out of memory: this shape runs without graphs from now on, and every graph is dropped
        (their memory back to the requests' activations; the other shapes are captured again on their next
        calls). Graphs stay on: unlike other capture failures, this one says nothing is broken."""
        log.warning(
            "CUDA graphs: shape %s does not fit (block %d: %s); it runs without graphs, the others are dropped",
            self._shape,
            block_index,
            why,
        )
        self.too_large.append(self._shape)
        self.clear()
        release = getattr(self.backend, "release_memory", None)
        if release is not None:
            release()

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

    def _measure_free(self) -> int | None:
        measure = getattr(self.backend, "free_bytes", None)
        free = measure() if measure is not None else None
        allocated = getattr(self.backend, "allocated_bytes", None)
        if free is not None and self.budget_bytes is not None and allocated is not None:
            free = min(free, self.budget_bytes - allocated())
        self.free_bytes = free
        return free

    def _short_of_memory(self) -> bool:
        if not self.min_free_bytes or len(self._shapes) < 2:  # the shape being captured always stays
            return False
        free = self._measure_free()
        return free is not None and free < self.min_free_bytes

    def _evict_over_limit(self) -> None:
        while len(self._shapes) > self.max_shapes or self._short_of_memory():
            shape = next(iter(self._shapes))  # least recently used
            why = "memory" if len(self._shapes) <= self.max_shapes else "count"
            log.info("CUDA graphs: evicting shape %s (%d graphs; %s)", shape, len(self._shapes[shape]), why)
            self.evictions += 1
            self._forget(shape)
        self._measure_free()

    def clear(self) -> None:
        """Drop every graph; each shape is run, then captured again on its next calls."""
        for shape in list(self._shapes):
            self._forget(shape)
        self._shared.clear()  # also copies made for a capture that failed before its shape held a graph
        self.backend.new_pool()  # CUDA frees a pool with its last graph: later captures need a fresh one
        self._publish()

    def fail(self, reason: str, level: int = logging.ERROR) -> None:
        """Turn graphs off for good: drop every graph, say why in the report (and the log, at ``level``)."""
        log.log(level, "CUDA graphs turned off: %s", reason)
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
        signature = (manager.variant(), _signature(flat))
        captured = self.graphs.get(signature)
        if captured is None:
            if signature not in self.seen or not manager.capturing_allowed:
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
        out_of_memory = None
        try:
            replay, outputs = manager.backend.capture(lambda: self.forward(*args, **kwargs))
        except torch.OutOfMemoryError as exc:  # this shape's graphs do not fit in the memory left
            out_of_memory = str(exc).split(".")[0]
        except Exception as exc:  # graphs are an optimization: the request goes on without them
            manager.fail(f"block {self.index}: {type(exc).__name__}: {exc}")
            return None
        if out_of_memory is not None:  # outside the handler: the failed capture's tensors are gone with its frames
            manager.out_of_memory(self.index, out_of_memory)
            return None
        captured = _Captured(replay, inputs, outputs, shared)
        self.graphs[signature] = captured
        manager.register(self, signature, outputs)
        return captured
