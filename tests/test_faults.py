"""Faults inside a generation (FLUX_FAULT_INJECTION's X-Fault-Inject header): each gets its envelope with the request
id, the next request succeeds, requests queued behind the failing one are untouched; the watchdog sees a hung job
(readiness 503 with the reason, then back) and a dead worker."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import image_b64, wait_ready

SMALL = {"prompt": "a small test", "width": 256, "height": 256, "steps": 1, "seed": 5}
# A few tenths of a second each on the tiny model on CPU: long enough to have others queue behind it.
SLOWER = {"prompt": "slower", "image": image_b64(512, 512), "width": 512, "height": 512, "steps": 6, "seed": 8}
FAULT = "X-Fault-Inject"


def make_client(**settings) -> TestClient:
    """conftest's make_client, except that a 500 is answered as a client sees it (not raised into the test)."""
    app = create_app(Settings(**{"model": "tiny", "warmup": False, **settings}))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def faulty():
    with make_client(fault_injection=True, max_queue=8) as client:
        wait_ready(client)
        yield client


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.mark.parametrize(
    "fault, status, kind",
    [
        ("error@text_encoding", 500, "internal_error"),
        ("error@denoising:2", 500, "internal_error"),
        ("error@decoding", 500, "internal_error"),
        ("oom@text_encoding", 503, "out_of_memory"),
        ("oom@denoising:3", 503, "out_of_memory"),
        ("oom@decoding", 503, "out_of_memory"),
    ],
)
def test_a_fault_in_each_phase_gets_its_envelope_with_the_request_id_and_the_next_request_succeeds(
    faulty, fault, status, kind
):
    request_id = f"fault-{fault.replace('@', '-').replace(':', '-')}"
    body = {**SMALL, "steps": 4}
    failed = faulty.post("/inference", json=body, headers={FAULT: fault, "X-Request-ID": request_id})
    assert failed.status_code == status, failed.text
    error = failed.json()["error"]
    assert error["type"] == kind and error["request_id"] == request_id
    assert failed.headers["X-Request-ID"] == request_id
    if status == 503:
        assert int(failed.headers["Retry-After"]) > 0
        assert "smaller size" in error["message"]
    assert faulty.get("/health/ready").status_code == 200
    assert faulty.post("/inference", json=body).status_code == 200


def test_requests_queued_behind_a_failing_job_are_untouched(faulty):
    others = [{**SMALL, "prompt": f"queued {i}", "seed": 40 + i} for i in range(3)]
    alone = [faulty.post("/inference", json=body).json()["images"][0]["image"] for body in others]
    with ThreadPoolExecutor(4) as pool:
        failing = pool.submit(faulty.post, "/inference", json=SLOWER, headers={FAULT: "error@denoising:5"})
        wait_until(lambda: faulty.get("/health").json()["queue"]["depth"], what="the failing job running")
        queued = [pool.submit(faulty.post, "/inference", json=body) for body in others]
        assert failing.result().status_code == 500
        responses = [future.result() for future in queued]
    assert [response.status_code for response in responses] == [200, 200, 200]
    for body, response, image in zip(others, responses, alone, strict=True):
        assert response.json()["prompt"] == body["prompt"]
        assert response.json()["images"][0]["image"] == image  # the same bytes as when run alone


def test_the_fault_header_is_ignored_unless_injection_is_on_and_checked_when_it_is(client, faulty):
    assert client.post("/inference", json=SMALL, headers={FAULT: "error@decoding"}).status_code == 200
    refused = faulty.post("/inference", json=SMALL, headers={FAULT: "explode@somewhere"})
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_fault"
    assert "oom@denoising:3" in refused.json()["error"]["message"]


def test_a_job_hung_past_its_timeout_gets_504_turns_readiness_503_with_the_reason_then_recovers():
    settings = {"fault_injection": True, "request_timeout_s": 2.0, "job_stop_grace_s": 0.5, "stuck_restart_s": 0.5}
    with make_client(**settings) as client:
        wait_ready(client)
        hung = client.post("/inference", json=SMALL, headers={FAULT: "hang=6@denoising:1"})
        assert hung.status_code == 504 and hung.json()["error"]["type"] == "timeout"

        ready = wait_until(lambda: (r := client.get("/health/ready")).status_code == 503 and r, what="readiness 503")
        assert ready.json()["state"] == "worker_stuck"
        assert "stuck" in ready.json()["reason"] and "FLUX_JOB_STOP_GRACE_S" in ready.json()["reason"]
        assert client.get("/health").status_code == 503
        refused = client.post("/inference", json=SMALL)
        assert refused.status_code == 503 and "stuck" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"]
        live = wait_until(lambda: (r := client.get("/health/live")).status_code == 503 and r, what="liveness 503")
        assert live.json()["status"] == "restart_needed"

        wait_until(lambda: client.get("/health/ready").status_code == 200, what="readiness back to 200")
        assert client.get("/health/live").status_code == 200
        assert client.post("/inference", json={**SMALL, "steps": 1}).status_code == 200


def test_a_dead_worker_turns_readiness_and_liveness_503_and_answers_every_waiting_caller():
    with make_client(fault_injection=True) as client:
        wait_ready(client)
        with ThreadPoolExecutor(2) as pool:
            crashed = pool.submit(client.post, "/inference", json=SLOWER, headers={FAULT: "crash@denoising:4"})
            wait_until(lambda: client.get("/health").json()["queue"]["depth"], what="the crashing job running")
            waiting = pool.submit(client.post, "/inference", json=SMALL)
            for response in (crashed.result(), waiting.result()):
                assert response.status_code == 503, response.text
                assert "GPU worker stopped" in response.json()["error"]["message"]
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["state"] == "worker_stopped"
        assert client.get("/health/live").status_code == 503
        assert client.post("/inference", json=SMALL).status_code == 503


@pytest.mark.gpu
@pytest.mark.parametrize("fault", ["error@denoising:2", "oom@decoding"])
def test_gpu_memory_is_released_after_a_fault(fault):
    with make_client(fault_injection=True) as client:
        wait_ready(client, timeout_s=900)
        client.post("/inference", json=SMALL)
        before = torch.cuda.memory_allocated()
        assert client.post("/inference", json=SMALL, headers={FAULT: fault}).status_code in (500, 503)
        assert torch.cuda.memory_allocated() <= before  # the job's tensors and the fault's 64 MiB are gone
