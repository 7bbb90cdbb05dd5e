"""Prometheus metrics: one registry per app, so tests and several apps in a process do not collide.

HTTP metrics come from the small ASGI middleware in service.py (``RequestMetrics``) rather than an instrumentation
library such as prometheus-fastapi-instrumentator: it sits outside the other middlewares (only the request id's
is further out), so it also counts the answers other middlewares give before routing (413, 429, 401/403) and the
500 of an exception that escapes the app; it labels by route template
(``/v1/jobs/{job_id}``, never the raw path, so the label set stays bounded) from the route Starlette matched; and the
status it records is ours to define, so that a client that went away can carry a status of its own (499) instead of
500. A library would add a second request counter beside ``flux_requests_total`` without these.

What a generation did (mode, cache and graph counters, phase timings) comes from the response body
(``observe_result``) or, for the mode and final status of synchronous requests, from the key ``GENERATION_MODE``
the inference path leaves in the ASGI scope.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
# HTTP latency: from the health probes (sub-millisecond) to generations waiting in the queue (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300, 600)
GENERATION_MODE = "flux_kontext.generation_mode"  # ASGI scope key: "edit" or "text_to_image", set by the route
MODES = ("edit", "text_to_image")
CACHE_RESULTS = ("computed", "skipped")
GRAPH_CALLS = ("replayed", "captured", "eager")  # the keys of a response's cuda_graphs counters
GPU_MEMORY = {
    "allocated": "GPU memory held by tensors now",
    "reserved": "GPU memory held by PyTorch's caching allocator now (allocated plus cached free blocks)",
    "peak": "Most GPU memory held by tensors since start or the last /benchmark (which resets it)",
}


class GpuMemoryCollector:
    """flux_gpu_memory_{allocated,reserved,peak}_bytes, read at each scrape. Absent on a CPU (no device memory:
    a 0 would read as an empty GPU)."""

    def __init__(self, memory_bytes: Callable[[], dict[str, int] | None]):
        self.memory_bytes = memory_bytes

    def collect(self):
        memory = self.memory_bytes()
        if not memory:
            return
        for name, help_text in GPU_MEMORY.items():
            yield GaugeMetricFamily(f"flux_gpu_memory_{name}_bytes", help_text, value=memory[name])


class Metrics:
    def __init__(self, queue_depth, graph_evictions=lambda: 0, gpu_memory_bytes=lambda: None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "flux_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "flux_http_request_duration_seconds",
            "HTTP request latency (to the end of the response) by route template and method",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generations = Counter(
            "flux_generation_requests",
            "Generation requests (/inference, OpenAI routes, async jobs) by mode and final status code; "
            "an async job counts when it ends (200 succeeded, its error's status failed, 499 cancelled)",
            ["mode", "status"],
            registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "flux_phase_seconds", "Time per generation phase", ["phase"], buckets=PHASE_BUCKETS, registry=self.registry
        )
        self.images = Counter("flux_images_generated", "Images returned to clients", registry=self.registry)
        self.cache_calls = Counter(
            "flux_first_block_cache_transformer_calls",
            "Transformer calls under the first-block cache: computed in full, or skipped (the cached residual reused)",
            ["result"],
            registry=self.registry,
        )
        self.graph_calls = Counter(
            "flux_cuda_graph_block_calls",
            "Transformer block calls: replayed from a CUDA graph, captured, or run eager (a shape's first call)",
            ["kind"],
            registry=self.registry,
        )
        for result in CACHE_RESULTS:
            self.cache_calls.labels(result=result)
        for kind in GRAPH_CALLS:
            self.graph_calls.labels(kind=kind)
        depth = Gauge("flux_queue_depth", "Jobs waiting or running", registry=self.registry)
        depth.set_function(queue_depth)
        evictions = Gauge(
            "flux_cuda_graph_evictions",
            "Input shapes whose CUDA graphs the LRU dropped since start",
            registry=self.registry,
        )
        evictions.set_function(graph_evictions)
        self.registry.register(GpuMemoryCollector(gpu_memory_bytes))

    def observe_http(self, endpoint: str, method: str, status: int, seconds: float, mode: str | None) -> None:
        """One HTTP response (``mode``: the generation mode its route recorded, if it ran one)."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint, method=method).observe(seconds)
        if mode is not None:
            self.observe_generation(mode, status)

    def observe_generation(self, mode: str, status: int) -> None:
        self.generations.labels(mode=mode, status=str(status)).inc()

    def observe_result(self, body: dict) -> None:
        """A generation's response body: its phase timings, images, and cache and graph counters."""
        for phase, ms in body["timings_ms"].items():
            self.phase_seconds.labels(phase=phase).observe(ms / 1000.0)
        self.images.inc(len(body["images"]))
        for result in CACHE_RESULTS:
            self.cache_calls.labels(result=result).inc((body.get("first_block_cache") or {}).get(result, 0))
        for kind in GRAPH_CALLS:
            self.graph_calls.labels(kind=kind).inc((body.get("cuda_graphs") or {}).get(kind, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
