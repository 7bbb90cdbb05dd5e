"""Prompt encoding where the memory plan puts the text encoders, with a bounded cache of prompt embeddings.

T5-XXL off the GPU (memory plan tier 2) costs time per new prompt: a copy to the GPU (``on_demand``) or a CPU run.
A repeated prompt's embeddings come from the cache instead (the same tensors: encoding is deterministic).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

import torch


class OnDemand:
    """Copies a module's weights (kept in pinned host memory) to the GPU for one call, and drops the copies after."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self._host = [(param, param.data) for param in module.parameters()]

    def __enter__(self):
        for param, host in self._host:
            param.data = host.to(self.device, non_blocking=True)
        return self

    def __exit__(self, *exc):
        for param, host in self._host:
            param.data = host
        return False


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
        self._on_demand = OnDemand(pipe.text_encoder_2, device) if t5_placement == "on_demand" else None

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
            if self.cache is not None:
                self.cache.put(key, (embeds.to("cpu"), pooled.to("cpu")))
        else:
            embeds, pooled = (t.to(self.device, non_blocking=True) for t in cached)
        # As the pipeline repeats them for num_images_per_prompt.
        return embeds.repeat(num_images, 1, 1), pooled.repeat(num_images, 1)
