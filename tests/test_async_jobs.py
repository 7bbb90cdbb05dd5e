"""Async jobs (/v1/jobs, Prefer: respond-async): submit, poll, cancel, progress events, raw image bytes, limits."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from flux_kontext.engine import Engine
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import decode_b64_image, image_b64, image_bytes, make_client, wait_ready

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"prompt": "a small test", "width": 256, "height": 256, "steps": 2}


class GatedEngine(Engine):
    """The real engine; the test can hold a generation before it starts, or after a given denoising step."""

    def __init__(self, settings):
        super().__init__(settings)
        self.load_gate, self.run_gate, self.step_gate = threading.Event(), threading.Event(), threading.Event()
        self.load_gate.set()
        self.run_gate.set()
        self.step_gate.set()
        self.holding = threading.Event()  # set while a generation waits at hold_at_step
        self.hold_at_step: int | None = None
        self.prompts: list[str] = []  # every job the queue handed to the engine
        self.fail_next = False

    def load(self):
        self.load_gate.wait()
        super().load()

    def generate(self, job):
        self.prompts.append(job.prompt)
        return super().generate(job)

    def _run(self, job):
        self.run_gate.wait(30)
        if self.fail_next:
            self.fail_next = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        report = job.on_step

        def on_step(done, total):
            if report is not None:
                report(done, total)
            if done == self.hold_at_step:
                self.holding.set()
                self.step_gate.wait(30)

        job.on_step = on_step
        return super()._run(job)


@pytest.fixture(scope="module")
def gated():
    engines = []

    def factory(settings):
        engines.append(GatedEngine(settings))
        return engines[0]

    app = create_app(Settings(model="tiny", warmup=False, max_queue=2), factory)
    with TestClient(app) as client:
        wait_ready(client)
        engine = engines[0]
        yield client, engine
        engine.run_gate.set()
        engine.step_gate.set()


@pytest.fixture
def gates(gated):
    """The gated client and engine, every gate open again after the test."""
    client, engine = gated
    try:
        yield client, engine
    finally:
        engine.hold_at_step = None
        engine.holding.clear()
        engine.run_gate.set()
        engine.step_gate.set()
        wait_idle(client)


def wait_idle(client, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while client.get("/health").json()["queue"]["depth"] and time.monotonic() < deadline:
        time.sleep(0.02)


def poll(client, job_id: str, until=("succeeded", "failed", "cancelled"), timeout_s=60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        if response.json()["status"] in until:
            return response.json()
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {until}: {response.json()['status']}")


def submit(client, body=None, **headers) -> dict:
    response = client.post("/v1/jobs", json=body or SMALL, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == response.json()["urls"]["get"]
    return response.json()


def read_events(lines, on_event=None) -> list[tuple[str, dict]]:
    """Parse a text/event-stream the way a plain client does: `event:` and `data:` lines, a blank line ends one."""
    events, name, data = [], None, []
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line.strip() and data:
            events.append((name, json.loads("\n".join(data))))
            if on_event:
                on_event(*events[-1])
            name, data = None, []
    return events


def test_submit_then_poll_returns_the_inference_body_and_raw_images_of_the_asked_size(client):
    accepted = submit(client, {**SMALL, "width": 320, "height": 256, "num_images": 2, "seed": 7})
    assert accepted["status"] in ("queued", "running", "succeeded")
    done = poll(client, accepted["id"])
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert [image["seed"] for image in result["images"]] == [7, 8]
    assert {decode_b64_image(image["image"]).size for image in result["images"]} == {(320, 256)}
    assert result["steps"] == 2 and "denoising" in result["timings_ms"]
    raw = client.get(f"/v1/jobs/{accepted['id']}/image", params={"index": 1})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    opened = Image.open(io.BytesIO(raw.content))
    assert opened.format == "PNG" and opened.size == (320, 256)
    assert client.get(f"/v1/jobs/{accepted['id']}/image", params={"index": 2}).status_code == 404


def test_inference_with_prefer_respond_async_answers_202_and_applies_the_preference(gates):
    client, _ = gates
    response = client.post("/inference", json=SMALL, headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    assert response.headers["Preference-Applied"] == "respond-async"
    assert response.headers["Location"] == f"/v1/jobs/{response.json()['id']}"
    assert poll(client, response.json()["id"])["status"] == "succeeded"
    assert client.post("/inference", json=SMALL).status_code == 200  # without the preference: synchronous


def test_a_multipart_edit_with_prefer_respond_async_on_inference_is_a_job(gates):
    client, _ = gates
    form = {"prompt": "add a moon", "steps": "2", "width": "256", "height": "256"}
    files = {"image": ("in.png", image_bytes(300, 200), "image/png")}
    response = client.post("/inference", data=form, files=files, headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    result = poll(client, response.json()["id"])["result"]
    assert result["mode"] == "edit" and result["images"][0]["width"] == 256


def test_progress_is_reported_while_running_with_an_eta(gates):
    client, engine = gates
    engine.step_gate.clear()
    engine.hold_at_step = 2
    job = submit(client, {**SMALL, "steps": 3})
    assert engine.holding.wait(30)
    running = poll(client, job["id"], until=("running",))
    assert running["progress"] == {"step": 2, "steps": 3}
    assert running["eta_s"] >= 0
    engine.step_gate.set()
    assert poll(client, job["id"])["status"] == "succeeded"


def test_cancelling_a_queued_job_keeps_it_off_the_gpu(gates):
    client, engine = gates
    engine.run_gate.clear()
    first = submit(client, {**SMALL, "prompt": "runs first"})
    deadline = time.monotonic() + 10
    while "runs first" not in engine.prompts and time.monotonic() < deadline:
        time.sleep(0.01)
    second = submit(client, {**SMALL, "prompt": "cancelled while queued"})
    assert client.get(f"/v1/jobs/{second['id']}").json()["status"] == "queued"
    cancelled = client.delete(f"/v1/jobs/{second['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    engine.run_gate.set()
    assert poll(client, first["id"])["status"] == "succeeded"
    wait_idle(client)
    assert "cancelled while queued" not in engine.prompts
    assert poll(client, second["id"])["status"] == "cancelled"
    again = client.delete(f"/v1/jobs/{second['id']}")
    assert again.status_code == 409 and again.json()["error"]["type"] == "job_finished"
    assert client.delete(f"/v1/jobs/{first['id']}").status_code == 409
    assert client.get(f"/v1/jobs/{second['id']}/image").status_code == 409


def test_cancelling_a_running_job_stops_it_at_the_next_step(gates):
    client, engine = gates
    engine.step_gate.clear()
    engine.hold_at_step = 1
    job = submit(client, {**SMALL, "steps": 20})
    assert engine.holding.wait(30)
    assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    engine.step_gate.set()
    wait_idle(client)
    state = poll(client, job["id"])
    assert state["status"] == "cancelled"
    assert state["progress"] == {"step": 1, "steps": 20}  # the other 19 steps never ran
    assert poll(client, submit(client)["id"])["status"] == "succeeded"  # and the GPU is free again


def test_a_full_queue_answers_429_with_retry_after(gates):
    client, engine = gates
    engine.run_gate.clear()
    accepted = [submit(client) for _ in range(3)]  # one running + two waiting (max_queue=2)
    refused = client.post("/v1/jobs", json=SMALL)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "overloaded"
    assert int(refused.headers["Retry-After"]) > 0
    async_refused = client.post("/inference", json=SMALL, headers={"Prefer": "respond-async"})
    assert async_refused.status_code == 429
    engine.run_gate.set()
    assert [poll(client, job["id"])["status"] for job in accepted] == ["succeeded"] * 3


def test_a_failed_job_carries_the_error_envelope_and_its_status(gates):
    client, engine = gates
    engine.fail_next = True
    failed = poll(client, submit(client)["id"])
    assert failed["status"] == "failed"
    assert failed["status_code"] == 503
    assert failed["error"]["type"] == "out_of_memory"


def test_not_ready_is_503_and_bad_input_is_422_naming_the_field():
    engine = None

    def factory(settings):
        nonlocal engine
        engine = GatedEngine(settings)
        engine.load_gate.clear()  # never loads
        return engine

    with TestClient(create_app(Settings(model="tiny", warmup=False), factory)) as client:
        refused = client.post("/v1/jobs", json=SMALL)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
        assert "Retry-After" in refused.headers
    with make_client() as client:
        wait_ready(client)
        bad = client.post("/v1/jobs", json={**SMALL, "width": 1000, "height": 256})
        assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "width"


@pytest.mark.parametrize("suffix", ["", "/events", "/image"])
def test_an_unknown_or_expired_job_is_a_404_in_the_envelope(client, suffix):
    response = client.get(f"/v1/jobs/job-doesnotexist{suffix}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert "no longer kept" in response.json()["error"]["message"]


def test_the_event_stream_sends_queued_each_step_then_the_result(gates):
    client, engine = gates
    engine.run_gate.clear()
    job = submit(client, {**SMALL, "steps": 3})

    def release(name, data):  # the GPU starts once the client has the stream
        engine.run_gate.set()

    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = read_events(stream.iter_lines(), release)
    names = [name for name, _ in events]
    assert names == ["queued", "progress", "progress", "progress", "succeeded"], names
    assert [data["progress"] for _, data in events[1:4]] == [{"step": i, "steps": 3} for i in (1, 2, 3)]
    images = events[-1][1]["result"]["images"]
    assert decode_b64_image(images[0]["image"]).size == (256, 256)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:  # a finished job: its outcome, at once
        assert [name for name, _ in read_events(stream.iter_lines())] == ["succeeded"]


def test_accept_event_stream_on_submit_streams_the_same_events(gates):
    client, engine = gates
    engine.run_gate.clear()
    headers = {"Accept": "text/event-stream"}
    with client.stream("POST", "/v1/jobs", json=SMALL, headers=headers) as stream:
        assert stream.status_code == 200 and stream.headers["Location"].startswith("/v1/jobs/job-")
        events = read_events(stream.iter_lines(), lambda name, data: engine.run_gate.set())
    assert [name for name, _ in events] == ["queued", "progress", "progress", "succeeded"]


def test_prefer_wait_with_accept_image_answers_the_image_bytes(client):
    response = client.post("/v1/jobs", json=SMALL, headers={"Prefer": "wait=60", "Accept": "image/webp"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    opened = Image.open(io.BytesIO(response.content))
    assert opened.format == "WEBP" and opened.size == (256, 256)


def test_finished_jobs_beyond_the_count_limit_are_evicted_oldest_first():
    with make_client(max_kept_jobs=2) as client:
        wait_ready(client)
        ids = []
        for _ in range(3):
            response = client.post("/v1/jobs", json=SMALL, headers={"Prefer": "wait=60"})
            assert response.status_code == 200 and response.json()["status"] == "succeeded"
            ids.append(response.json()["id"])
        assert client.get(f"/v1/jobs/{ids[0]}").status_code == 404
        assert client.get(f"/v1/jobs/{ids[0]}/image").status_code == 404
        assert [client.get(f"/v1/jobs/{i}").json()["status"] for i in ids[1:]] == ["succeeded"] * 2


def test_a_job_runs_on_when_its_submitting_connection_and_its_event_stream_close(tmp_path):
    """Through a real uvicorn: the connection really closes (unlike /inference, where that stops the job)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "FLUX_MODEL": "tiny", "FLUX_WARMUP": "false", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "uvicorn", "flux_kontext_optimized:app", "--port", str(port)]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        slow = {"prompt": "slow", "image": image_b64(512, 512), "steps": 20, "scheduler": "euler"}
        headers = {"Accept": "text/event-stream"}
        with httpx.stream("POST", f"{base}/v1/jobs", json=slow, headers=headers, timeout=60) as stream:
            job_url = stream.headers["Location"]
            for line in stream.iter_lines():
                if line.startswith("event: progress"):
                    break  # and close the connection mid-job
        state = httpx.get(f"{base}{job_url}", timeout=5).json()
        assert state["status"] == "running" and state["progress"]["step"] < 20, state
        with httpx.stream("GET", f"{base}{job_url}/events", timeout=60) as stream:
            next(stream.iter_lines())  # one line of the event stream, then leave
        deadline = time.monotonic() + 60
        while state["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
            state = httpx.get(f"{base}{job_url}", timeout=5).json()
        assert state["status"] == "succeeded", state
        assert state["result"]["steps"] == 20
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
