"""Prompt encoding where the memory plan puts the text encoders, with a bounded cache of prompt embeddings.

T5-XXL off the GPU (memory plan tier 2) costs a copy to the GPU per new prompt: whole (``on_demand``) or one layer at
a time as it runs (``streamed``). A repeated prompt's embeddings come from the cache instead (the same tensors:
encoding is deterministic).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import torch


def on_demand(module: torch.nn.Module, device: torch.device) -> Visit:
    """The whole module's weights (kept in pinned host memory) on the GPU for one call, dropped after."""
    return Visit(list(module.parameters()), device)


class Streamed:
    """Copies T5's embedding and final norm to the GPU for one call, and each layer only while it runs."""

    def __init__(self, t5: torch.nn.Module, device: torch.device):
        from flux_kontext.loading import blocks_of

        layers = [block for _, block in blocks_of("text_encoder_2", t5)]
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        self._rest = Visit([p for p in t5.parameters() if id(p) not in in_layers], device)
        self._layers = [(layer, Visit(list(layer.parameters()), device)) for layer in layers]
        self._hooks: list = []

    def __enter__(self):
        self._rest.__enter__()
        for layer, visit in self._layers:
            self._hooks.append(layer.register_forward_pre_hook(visit.arrive))
            self._hooks.append(layer.register_forward_hook(visit.leave))
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for _, visit in self._layers:
            visit.__exit__()  # a layer left on the GPU by an exception inside it
        self._rest.__exit__()
        return False


class Visit:
    """Parameters' data on ``device`` while entered, their host tensors again after (exit is idempotent)."""

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device):
        self.device = device
        self._host = [(param, param.data) for param in params]

    def __enter__(self):
        for param, host in self._host:
            param.data = host.to(self.device, non_blocking=True)
        return self

    def __exit__(self, *exc):
        for param, host in self._host:
            param.data = host
        return False

    def arrive(self, *_hook_args) -> None:  # a forward pre-hook: returns None, so the inputs stay as they are
        self.__enter__()

    def leave(self, *_hook_args) -> None:  # a forward hook: returns None, so the output stays as it is
        self.__exit__()


class PromptCache:
    """LRU of (prompt embeddings, pooled embedding) per key, kept in host memory (outside the GPU's budget)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hits = self.misses = 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def public(self) -> dict:
        return {"entries": len(self._entries), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


class PromptEncoder:
    """``encode(prompt, num_images)`` -> (prompt embeddings, pooled), on the pipeline's execution device."""

    def __init__(self, pipe, device: torch.device, max_sequence_length: int, t5_placement: str, cache_size: int):
        self.pipe, self.device, self.max_sequence_length = pipe, device, max_sequence_length
        self.cache = PromptCache(cache_size) if cache_size else None
        visits = {"on_demand": on_demand, "streamed": Streamed}
        visit = visits.get(t5_placement)
        self._on_demand = visit(pipe.text_encoder_2, device) if visit is not None else None

    def encode(self, prompt: str, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (prompt, self.max_sequence_length)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is None:
            with self._on_demand or contextlib.nullcontext():
                embeds, pooled, _ = self.pipe.encode_prompt(
                    prompt=prompt,
                    prompt_2=None,
                    device=self.device,
                    num_images_per_prompt=1,
                    max_sequence_length=self.max_sequence_length,
                )
            if self._on_demand is not None and self.device.type == "cuda":
                # T5's visit leaves its GPU copy in the caching allocator's free blocks (8.9 GiB in T5's sizes),
                # holding the budget's room: capped at 24 GiB, reserved memory peaked at 23.3 GiB without this and
                # 21.4 GiB with it (BENCHMARKS.md "Memory tiers ... 16 to 48 GiB").
                torch.cuda.empty_cache()
            if self.cache is not None:
                self.cache.put(key, (embeds.to("cpu"), pooled.to("cpu")))
        else:
            embeds, pooled = (t.to(self.device, non_blocking=True) for t in cached)
        # As the pipeline repeats them for num_images_per_prompt.
        return embeds.repeat(num_images, 1, 1), pooled.repeat(num_images, 1)
