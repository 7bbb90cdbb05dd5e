"""GET /metrics during a few requests: counts by mode and status, latency per route template, cache counters."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from flux_kontext.metrics import Metrics
from tests.conftest import image_b64

T2I = {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 2, "seed": 1}
EDIT = {"prompt": "make it night", "image": image_b64(64, 48), "steps": 2, "seed": 2}


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, (label, value), ...): value} of a Prometheus text page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


def value(page: dict, name: str, **labels) -> float:
    return page.get((name, *sorted(labels.items())), 0.0)


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    return samples(response.text)


def test_generation_requests_are_counted_by_mode_and_status(client):
    before = scrape(client)
    assert client.post("/inference", json=T2I).status_code == 200
    assert client.post("/inference", json=EDIT).status_code == 200
    assert client.post("/inference", json=EDIT).status_code == 200
    assert client.post("/inference", json={**EDIT, "image": "bm90IGFuIGltYWdl"}).status_code == 400
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256"}).status_code == 200
    after = scrape(client)

    def delta(mode, status):
        name = "flux_generation_requests_total"
        return value(after, name, mode=mode, status=status) - value(before, name, mode=mode, status=status)

    assert delta("text_to_image", "200") == 2  # /inference and the OpenAI route
    assert delta("edit", "200") == 2
    assert delta("edit", "400") == 1
    assert delta("text_to_image", "400") == 0


def test_an_async_job_counts_when_it_ends(client):
    before = scrape(client)
    job = client.post("/v1/jobs", json=T2I)
    assert job.status_code == 202
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job.json()['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    after = scrape(client)
    name = "flux_generation_requests_total"
    counted = value(after, name, mode="text_to_image", status="200") - value(
        before, name, mode="text_to_image", status="200"
    )
    assert counted == 1
    # latency by route template, not raw path: the job id is not a label
    polls = value(after, "flux_http_request_duration_seconds_count", endpoint="/v1/jobs/{job_id}", method="GET")
    assert polls >= 1
    assert not any(job.json()["id"] in str(key) for key in after)


def test_latency_histogram_per_route(client):
    before = scrape(client)
    for _ in range(3):
        client.get("/health/live")
    client.post("/inference", json={**T2I, "steps": 0})  # a 422 has a latency too
    after = scrape(client)
    count = "flux_http_request_duration_seconds_count"
    assert (
        value(after, count, endpoint="/health/live", method="GET")
        - value(before, count, endpoint="/health/live", method="GET")
        == 3
    )
    assert value(after, count, endpoint="/inference", method="POST") > value(
        before, count, endpoint="/inference", method="POST"
    )
    bucket = value(after, "flux_http_request_duration_seconds_bucket", endpoint="/health/live", method="GET", le="+Inf")
    assert bucket == value(after, count, endpoint="/health/live", method="GET")


def test_first_block_cache_counters_add_up_what_the_responses_report(client):
    before = scrape(client)
    reported = {"computed": 0, "skipped": 0}
    for seed in (3, 4):
        body = client.post("/inference", json={**T2I, "seed": seed, "steps": 4}).json()
        for key in reported:
            reported[key] += body["first_block_cache"][key]
    after = scrape(client)
    name = "flux_first_block_cache_transformer_calls_total"
    for result, calls in reported.items():
        assert value(after, name, result=result) - value(before, name, result=result) == calls
    assert reported["computed"] > 0


def test_cpu_has_no_gpu_memory_gauges_and_graph_counters_stay_zero(client):
    client.post("/inference", json=T2I)
    page = scrape(client)
    assert not any(key[0].startswith("flux_gpu_memory") for key in page)
    for kind in ("replayed", "captured", "eager"):
        assert ("flux_cuda_graph_block_calls_total", ("kind", kind)) in page
        assert value(page, "flux_cuda_graph_block_calls_total", kind=kind) == 0


def test_gpu_memory_gauges_read_the_engine_at_each_scrape():
    memory = {"allocated": 10, "reserved": 20, "peak": 15}
    metrics = Metrics(lambda: 0, gpu_memory_bytes=lambda: dict(memory))
    page = samples(metrics.render().decode())
    assert value(page, "flux_gpu_memory_allocated_bytes") == 10
    assert value(page, "flux_gpu_memory_reserved_bytes") == 20
    memory["peak"] = 99
    assert value(samples(metrics.render().decode()), "flux_gpu_memory_peak_bytes") == 99


def test_graph_counters_follow_the_responses():
    metrics = Metrics(lambda: 0)
    body = {"timings_ms": {}, "images": [], "first_block_cache": None}
    metrics.observe_result({**body, "cuda_graphs": {"replayed": 57, "captured": 0, "eager": 0}})
    metrics.observe_result({**body, "cuda_graphs": {"replayed": 0, "captured": 57, "eager": 57}})
    page = samples(metrics.render().decode())
    assert value(page, "flux_cuda_graph_block_calls_total", kind="replayed") == 57
    assert value(page, "flux_cuda_graph_block_calls_total", kind="captured") == 57
    assert value(page, "flux_cuda_graph_block_calls_total", kind="eager") == 57
