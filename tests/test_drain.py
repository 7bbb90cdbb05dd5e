"""Graceful drain on SIGTERM/SIGINT: readiness 503 with the listener open, new work 503, accepted work answered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import image_b64, make_client, wait_ready
from tests.live_server import ROOT, live_process

# About 1.5 s each on the tiny model on CPU (16 steps, a 512² output with a 512² context image).
SLOW = {"prompt": "slow", "image": image_b64(512, 512), "width": 512, "height": 512, "steps": 16, "scheduler": "euler"}
FAST = {"prompt": "fast", "width": 256, "height": 256, "steps": 1}
SHUTTING_DOWN = "the server is shutting down"


def assert_shutting_down(response: httpx.Response, openai: bool = False) -> str:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"]
    error = response.json()["error"]
    assert (error["code"] if openai else error["type"]) == "shutting_down", error
    assert error["message"].startswith(SHUTTING_DOWN), error
    return error["message"]


def test_sigterm_drains_then_exits_0_with_every_accepted_request_answered():
    drain_s, bound_s = 5.0, 10.0
    with live_process(serve=True, FLUX_DRAIN_TIMEOUT_S=str(drain_s)) as (base, _, process, output):
        with ThreadPoolExecutor(5) as pool:
            # The first (about 0.4 s) finishes within the drain even on a loaded machine; the 4 after it (about 2 s
            # each) cannot all.
            first = pool.submit(httpx.post, f"{base}/inference", json={**SLOW, "steps": 2}, timeout=60)
            while not httpx.get(f"{base}/health", timeout=5).json()["queue"]["depth"]:
                time.sleep(0.01)
            slow = {**SLOW, "steps": 24}
            pending = [first] + [pool.submit(httpx.post, f"{base}/inference", json=slow, timeout=60) for _ in range(4)]
            deadline = time.monotonic() + 10
            while httpx.get(f"{base}/health", timeout=5).json()["queue"]["depth"] < 5 - first.done():
                assert time.monotonic() < deadline, "the requests never all reached the queue"
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            # The listener stays open: probes see 503 "draining"; new work is refused with Retry-After.
            ready = httpx.get(f"{base}/health/ready", timeout=5)
            assert ready.status_code == 503 and ready.json()["state"] == "draining", ready.text
            health = httpx.get(f"{base}/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            assert_shutting_down(httpx.post(f"{base}/inference", json=FAST, timeout=10))
            assert_shutting_down(httpx.post(f"{base}/v1/jobs", json=FAST, timeout=10))
            generations = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x"}, timeout=10)
            assert_shutting_down(generations, openai=True)

            responses = [future.result() for future in pending]
        statuses = [response.status_code for response in responses]
        assert set(statuses) <= {200, 503}, (statuses, output())
        assert statuses[0] == 200 and statuses.count(503) >= 1, statuses
        messages = [assert_shutting_down(response) for response in responses if response.status_code == 503]
        assert all("not run" in message or "stopped" in message for message in messages), messages
        assert any("not run" in message for message in messages), messages
        assert process.wait(drain_s + bound_s) == 0, output()
        assert time.monotonic() - signalled < drain_s + bound_s


def test_drain_waits_for_an_async_job_still_encoding_after_its_gpu_work():
    """The GPU queue turning idle is not the job answered: its encoding and record come after, off the queue."""
    with make_client(max_queue=4) as client:
        wait_ready(client)
        service = client.app.state.service
        encoder = service.encoder

        class SlowEncoder:
            def __getattr__(self, name):
                return getattr(encoder, name)

            def encode_base64(self, *args, **kwargs):
                time.sleep(1.0)  # the queue is idle all this time
                return encoder.encode_base64(*args, **kwargs)

        service.encoder = SlowEncoder()
        job = client.post("/v1/jobs", json=FAST).json()
        while service.queue.depth:
            time.sleep(0.01)
        client.portal.call(service.drain, 10.0)
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_drain_finishes_accepted_async_jobs_in_time_and_fails_the_rest_with_the_reason():
    with make_client(max_queue=4) as client:
        wait_ready(client)
        service = client.app.state.service
        fast = client.post("/v1/jobs", json=FAST).json()
        client.portal.call(service.drain, 10.0)  # enough for the fast job
        assert client.get(f"/v1/jobs/{fast['id']}").json()["status"] == "succeeded"
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json() == {
            "ready": False,
            "state": "draining",
            "reason": SHUTTING_DOWN,
        }
        assert_shutting_down(client.post("/v1/jobs", json=FAST))

    with make_client(max_queue=4) as client:
        wait_ready(client)
        service = client.app.state.service
        jobs = [client.post("/v1/jobs", json=SLOW).json() for _ in range(3)]
        client.portal.call(service.drain, 0.3)  # too short for any of them
        states = [client.get(f"/v1/jobs/{job['id']}").json() for job in jobs]
        assert [state["status"] for state in states] == ["failed"] * 3, states
        assert {state["status_code"] for state in states} == {503}
        messages = [state["error"]["message"] for state in states]
        assert all(state["error"]["type"] == "shutting_down" for state in states)
        assert "stopped" in messages[0] and all("not run" in message for message in messages[1:]), messages
        assert service.queue.depth == 0  # the running one stopped at its next step
        assert_shutting_down(client.post("/inference", json=FAST))


@pytest.mark.parametrize("how", [["--workers", "2"], ["WEB_CONCURRENCY=3"]])
def test_serve_refuses_several_workers(how):
    env = {**os.environ, "FLUX_MODEL": "tiny"}
    args = [arg for arg in how if "=" not in arg]
    env.update(arg.split("=", 1) for arg in how if "=" in arg)
    command = [sys.executable, "flux_kontext_optimized.py", "serve", "--port", "0", *args]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "one worker process per GPU" in completed.stderr
