"""Prometheus metrics: one registry per app, so tests and several apps in a process do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, queue_depth, graph_evictions=lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "flux_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=self.registry
        )
        self.phase_seconds = Histogram(
            "flux_phase_seconds", "Time per generation phase", ["phase"], buckets=PHASE_BUCKETS, registry=self.registry
        )
        self.images = Counter("flux_images_generated", "Images returned to clients", registry=self.registry)
        depth = Gauge("flux_queue_depth", "Jobs waiting or running", registry=self.registry)
        depth.set_function(queue_depth)
        evictions = Gauge(
            "flux_cuda_graph_evictions",
            "Input shapes whose CUDA graphs the LRU dropped since start",
            registry=self.registry,
        )
        evictions.set_function(graph_evictions)

    def observe_timings(self, timings_ms: dict[str, float]) -> None:
        for phase, ms in timings_ms.items():
            self.phase_seconds.labels(phase=phase).observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
