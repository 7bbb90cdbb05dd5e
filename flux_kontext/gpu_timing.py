"""Milliseconds per call of a GPU function, timed with CUDA events (the start-up measurements that choose kernels)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def gpu_milliseconds(fn: Callable[[], object], repeats: int = 20, warmup: int = 1) -> float:
    """Mean milliseconds of `fn` over `repeats` back-to-back calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats
