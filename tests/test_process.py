"""The service as users run it: a real uvicorn process, and the command-line entry point."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import decode_b64_image, image_b64
from tests.live_server import live_server
from tests.test_inference import SEED_CURL_BODY


@pytest.fixture(scope="module")
def server():
    """uvicorn flux_kontext_optimized:app with the tiny model and a queue of 4."""
    with live_server(FLUX_MAX_QUEUE="4") as running:
        yield running


def test_health_is_503_until_the_model_is_ready(server):
    _, seen = server
    assert set(seen) <= {503, 200}


def test_seed_curl_example_verbatim(server):
    base, _ = server
    response = httpx.post(f"{base}/inference", json=SEED_CURL_BODY, timeout=120)
    assert response.status_code == 200, response.text
    assert decode_b64_image(response.json()["images"][0]["image"]).size == (1024, 1024)


def test_edit_of_non_square_png_returns_the_snapped_preferred_size(server):
    base, _ = server
    body = {"prompt": "make it night", "image": image_b64(640, 480), "steps": 2, "seed": 9}
    response = httpx.post(f"{base}/inference", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert decode_b64_image(response.json()["images"][0]["image"]).size == (1184, 880)


def test_twenty_concurrent_requests_with_a_queue_of_four(server):
    base, _ = server

    def one(i: int) -> tuple[int, httpx.Response]:
        size = 256 + 16 * (i % 4)
        body = {"prompt": f"request {i}", "width": size, "height": 256, "steps": 4, "seed": 500 + i}
        return i, httpx.post(f"{base}/inference", json=body, timeout=300)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    statuses = [response.status_code for _, response in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 5, statuses
    for i, response in results:
        if response.status_code == 429:
            assert response.headers["Retry-After"]
            continue
        body = response.json()
        image = body["images"][0]
        assert body["prompt"] == f"request {i}"
        assert image["seed"] == 500 + i
        assert decode_b64_image(image["image"]).size == (256 + 16 * (i % 4), 256)
    assert httpx.get(f"{base}/health", timeout=5).json()["queue"]["depth"] == 0


def test_metrics_endpoint_in_prometheus_format(server):
    base, _ = server
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200
    assert "# TYPE flux_requests_total counter" in response.text


def test_a_client_that_disconnects_has_its_job_stopped(server):
    base, _ = server
    # About 5 s of denoising on the tiny model (50 steps, 1024² output plus a 1024² context image).
    slow = {"prompt": "slow", "image": image_b64(512, 512), "steps": 50, "scheduler": "euler"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/inference", json=slow, timeout=0.5)
    gave_up = time.monotonic()
    while httpx.get(f"{base}/health", timeout=5).json()["queue"]["depth"] and time.monotonic() < gave_up + 30:
        time.sleep(0.05)
    assert httpx.get(f"{base}/health", timeout=5).json()["queue"]["depth"] == 0
    assert time.monotonic() - gave_up < 2.5, "the job ran on after its client left"
    fast = httpx.post(f"{base}/inference", json={"prompt": "next", "width": 256, "height": 256, "steps": 1}, timeout=60)
    assert fast.status_code == 200
