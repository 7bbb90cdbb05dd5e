"""Lifecycle, queue, failures and the side endpoints, through the ASGI app with the tiny model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from flux_kontext.engine import Engine
from flux_kontext.jobs import Job, JobCancelled
from flux_kontext.models import build_random_pipeline
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import decode_b64_image, image_b64, wait_ready

SMALL = {"prompt": "a small test", "width": 256, "height": 256, "steps": 1}


class GatedEngine(Engine):
    """The real engine, but loading and each generation wait for the test to open a gate."""

    def __init__(self, settings, load_gate: threading.Event, run_gate: threading.Event):
        super().__init__(settings)
        self.load_gate, self.run_gate = load_gate, run_gate

    def load(self):
        self.load_gate.wait(30)
        super().load()

    def _run(self, job):
        self.run_gate.wait(30)
        return super()._run(job)


class OutOfMemoryOnce(Engine):
    """The real engine, whose next generation fails the way a GPU out-of-memory does."""

    fail_next = False

    def _run(self, job):
        if self.fail_next:
            self.fail_next = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super()._run(job)


def gated_client(load_open=True, run_open=True, **settings):
    load_gate, run_gate = threading.Event(), threading.Event()
    if load_open:
        load_gate.set()
    if run_open:
        run_gate.set()
    app = create_app(Settings(model="tiny", warmup=False, **settings), lambda s: GatedEngine(s, load_gate, run_gate))
    return TestClient(app), load_gate, run_gate


def test_health_is_503_while_loading_then_200():
    client, load_gate, _ = gated_client(load_open=False)
    with client:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] != "ok"
        assert response.json()["reason"]
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200
        refused = client.post("/inference", json=SMALL)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
        assert "Retry-After" in refused.headers
        load_gate.set()
        body = wait_ready(client)
        assert body["status"] == "ok" and body["demo"] is True
        assert client.get("/health/ready").status_code == 200
        assert client.post("/inference", json=SMALL).status_code == 200


def test_health_reports_device_model_queue_and_each_optimization(client):
    body = client.get("/health").json()
    assert body["device"]["type"] == "cpu"
    assert body["model"]["kind"] == "tiny"
    assert body["queue"] == {"depth": 0, "max_waiting": 8}
    reports = {report["name"]: report for report in body["optimizations"]}
    assert reports["attention"]["status"] == "applied"
    for name in ("flash_attention_3", "low_precision_gemm", "cuda_graphs", "compile"):
        assert reports[name]["status"] in ("unavailable", "skipped"), name
        assert reports[name]["detail"], name


def test_explicit_model_that_fails_to_load_is_an_error_not_a_fallback():
    with TestClient(create_app(Settings(model="/no/such/folder/flux", warmup=False))) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").json()["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.1)
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["state"] == "failed"
        assert "/no/such/folder/flux" in response.json()["reason"]
        assert client.post("/inference", json=SMALL).status_code == 503


def weights_not_found(source, settings, device, dtype):
    """What from_pretrained raises on a machine without the gated weights (and without network)."""
    raise OSError(f"Cannot load model {source}: the model is not fully cached locally")


def test_defaulted_model_that_cannot_be_found_falls_back_to_a_loud_demo(monkeypatch, caplog):
    # Patched rather than left to the network: a developer with the weights cached must not load 12B on CPU here.
    monkeypatch.setattr("flux_kontext.models._load_pretrained", weights_not_found)
    monkeypatch.delenv("FLUX_MODEL", raising=False)
    settings = Settings(warmup=False)
    assert not settings.model_is_explicit
    with TestClient(create_app(settings)) as client:
        body = wait_ready(client)
    assert body["demo"] is True
    assert body["model"]["kind"] == "tiny"
    assert "black-forest-labs/FLUX.1-Kontext-dev" in body["model"]["fallback_reason"]
    assert any("DEMO MODE" in record.getMessage() for record in caplog.records)


def test_local_folder_source_serves_a_saved_pipeline(tmp_path):
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    pipe.save_pretrained(tmp_path / "kontext")
    with TestClient(create_app(Settings(model=str(tmp_path / "kontext"), warmup=False))) as client:
        health = wait_ready(client)
        response = client.post("/inference", json={"prompt": "add snow", "image": image_b64(300, 200), "steps": 1})
    assert health["model"]["kind"] == "local" and health["demo"] is False
    assert response.status_code == 200, response.text
    assert decode_b64_image(response.json()["images"][0]["image"]).size == (1248, 832)


def test_full_queue_answers_429_with_retry_after_and_accepted_jobs_keep_their_own_results():
    client, _, run_gate = gated_client(run_open=False, max_queue=2)
    with client:
        wait_ready(client)
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(client.post, "/inference", json={**SMALL, "seed": 100 + i, "prompt": f"job {i}"})
                for i in range(8)
            ]
            time.sleep(1.5)  # let every request reach the queue while the worker is held
            run_gate.set()
            responses = [future.result() for future in futures]
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 3, statuses  # one running + two waiting
    assert statuses.count(429) == 5, statuses
    for i, response in enumerate(responses):
        if response.status_code == 429:
            assert response.json()["error"]["type"] == "overloaded"
            assert int(response.headers["Retry-After"]) > 0
        else:
            body = response.json()
            assert body["prompt"] == f"job {i}" and body["images"][0]["seed"] == 100 + i


def test_out_of_memory_fails_one_request_with_503_and_the_next_succeeds():
    app = create_app(Settings(model="tiny", warmup=False), OutOfMemoryOnce)
    with TestClient(app) as client:
        wait_ready(client)
        app.state.service.engine.fail_next = True
        failed = client.post("/inference", json=SMALL)
        assert failed.status_code == 503
        assert failed.json()["error"]["type"] == "out_of_memory"
        assert "fewer images or a smaller size" in failed.json()["error"]["message"]
        assert client.post("/inference", json=SMALL).status_code == 200


def test_benchmark_reports_phase_statistics(client):
    response = client.get("/benchmark", params={"runs": 2, "width": 256, "height": 256, "steps": 1, "mode": "edit"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["params"]["runs"] == 2 and body["params"]["mode"] == "edit"
    for phase in ("text_encoding", "image_encoding", "denoising", "decoding", "queue_wait", "engine_total"):
        stats = body["timings_ms"][phase]
        assert stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"], phase
    assert body["images_per_second"] > 0
    assert body["device"]["type"] == "cpu" and body["versions"]["torch"]
    assert "ran" in body["optimizations"]


@pytest.mark.parametrize("query", ["runs=0", "runs=1000", "width=1000", "mode=video", "steps=0", "scheduler=ddim"])
def test_benchmark_rejects_bad_parameters(client, query):
    response = client.get(f"/benchmark?{query}")
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"


def test_benchmark_never_runs_twice_at_once():
    client, _, run_gate = gated_client(run_open=False)
    with client:
        wait_ready(client)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.get, "/benchmark?runs=1&width=256&height=256&steps=1&mode=text_to_image")
            time.sleep(1.0)
            second = client.get("/benchmark?runs=1&width=256&height=256&steps=1")
            run_gate.set()
            assert first.result().status_code == 200
    assert second.status_code == 409
    assert second.json()["error"]["type"] == "benchmark_running"


def test_metrics_count_requests_and_phases(client):
    client.post("/inference", json=SMALL)
    client.post("/inference", json={**SMALL, "steps": 0})
    text = client.get("/metrics").text
    assert 'flux_requests_total{endpoint="/inference",status="200"}' in text
    assert 'flux_requests_total{endpoint="/inference",status="422"}' in text
    assert 'flux_phase_seconds_count{phase="denoising"}' in text
    assert "flux_queue_depth" in text
    assert "flux_cuda_graph_evictions 0.0" in text  # no graphs on CPU


def test_timeout_answers_504_and_stops_the_job_so_the_next_request_is_not_stuck_behind_it():
    app = create_app(Settings(model="tiny", warmup=False, request_timeout_s=0.5))
    with TestClient(app) as client:
        wait_ready(client)
        slow = client.post("/inference", json={"prompt": "slow", "width": 1024, "height": 1024, "steps": 50})
        assert slow.status_code == 504
        assert "FLUX_REQUEST_TIMEOUT_S" in slow.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while app.state.service.queue.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.service.queue.depth == 0  # stopped within a step or two, not after 50
        assert client.post("/inference", json=SMALL).status_code == 200


def test_engine_stops_a_cancelled_job_at_the_next_step():
    engine = Engine(Settings(model="tiny", warmup=False))
    engine.load()
    job = Job(prompt="x", seed=1, width=256, height=256, steps=30)
    calls = []

    def count_then_cancel(*args):  # the client leaves during the first denoising step
        calls.append(1)
        job.cancel()

    engine.model.pipe.transformer.register_forward_hook(count_then_cancel)
    with pytest.raises(JobCancelled):
        engine.generate(job)
    assert len(calls) == 1  # the remaining 29 steps were skipped
    with pytest.raises(JobCancelled):  # a job cancelled while waiting never starts
        engine.generate(job)


def test_an_unexpected_engine_error_is_a_500_in_the_envelope_and_counted():
    class Broken(Engine):
        def _run(self, job):
            raise RuntimeError("something unforeseen")

    with TestClient(create_app(Settings(model="tiny", warmup=False), Broken), raise_server_exceptions=False) as client:
        wait_ready(client)
        response = client.post("/inference", json=SMALL)
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "internal_error"
        assert 'flux_requests_total{endpoint="/inference",status="500"}' in client.get("/metrics").text


def test_a_dpm_scheduler_the_server_could_not_load_is_refused_not_faked(monkeypatch):
    from diffusers import FlowMatchHeunDiscreteScheduler

    from flux_kontext import engine as engine_module

    real_load = engine_module.load_model

    def load_with_another_scheduler(*args):  # a checkpoint whose scheduler is not the flow-matching Euler one
        model = real_load(*args)
        model.pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(model.pipe.scheduler.config)
        return model

    monkeypatch.setattr(engine_module, "load_model", load_with_another_scheduler)
    app = create_app(Settings(model="tiny", warmup=False))
    with TestClient(app) as client:
        wait_ready(client)
        dpm = next(r for r in client.get("/health").json()["optimizations"] if r["name"] == "dpm_solver")
        assert dpm["status"] == "failed" and "FlowMatchHeunDiscreteScheduler" in dpm["detail"]
        response = client.post("/inference", json={**SMALL, "scheduler": "dpmpp_2m"})
        assert response.status_code == 422
        assert "not available on this server" in response.json()["error"]["message"]
        assert client.post("/inference", json=SMALL).json()["scheduler"] == "euler"


def test_health_reports_each_start_up_phase_in_seconds(client):
    phases = client.get("/health").json()["startup_seconds"]
    assert {"load_model", "optimize", "warm_up", "since_process_start", "before_load"} <= set(phases)
    assert all(phases[name] >= 0 for name in ("load_model", "optimize", "warm_up"))
    if phases["since_process_start"] is not None:  # Linux: from the kernel's record of the process start
        assert phases["since_process_start"] >= phases["load_model"] + phases["optimize"] + phases["warm_up"]
    # Whether Python's bytecode is kept in the compile cache directory, and why not here (no directory set).
    assert client.get("/health").json()["startup_bytecode"] == {"kept": False, "why": "FLUX_COMPILE_CACHE_DIR unset"}
