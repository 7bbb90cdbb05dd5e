"""Async jobs (/v1/jobs, Prefer: respond-async): submit, poll, cancel, progress events, raw image bytes, limits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from flux_kontext.engine import Engine
from flux_kontext.protocols import async_jobs
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import decode_b64_image, image_b64, image_bytes, make_client, wait_ready
from tests.live_server import live_server

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


def test_a_job_runs_on_when_its_submitting_connection_and_its_event_stream_close():
    """Through a real uvicorn: the connection really closes (unlike /inference, where that stops the job)."""
    with live_server(ready_timeout_s=120, FLUX_WARMUP="false") as (base, _):
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


# ----- webhooks ------------------------------------------------------------------------------------------------------
SECRET = "whsec_" + base64.b64encode(b"a test key of thirty-two bytes!!").decode()


class Receiver:
    """A real HTTP server on 127.0.0.1 that records each POST and answers the statuses it is told (then 200)."""

    def __init__(self):
        self.requests: list[tuple[str, dict, bytes]] = []
        self.statuses: list[int] = []
        self.got = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.got:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.got.notify_all()
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout_s: float = 30.0) -> list[tuple[str, dict, bytes]]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.requests) >= count, timeout_s), self.requests
            return list(self.requests)


def verify(secret: str, headers: dict, body: bytes) -> bool:
    """The receiver's check, written from the Standard Webhooks spec (not the server's code)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", sig) for sig in headers["webhook-signature"].split())


def hook_settings(receiver: Receiver) -> Settings:
    """The tiny model, no warm-up, webhooks allowed to the receiver's /hooks/ (signed with SECRET)."""
    return Settings(
        model="tiny",
        warmup=False,
        webhook_allowed_prefixes=[f"{receiver.base}/hooks/"],
        webhook_secret=SECRET,
        webhook_timeout_s=5,
    )


@pytest.fixture(scope="module")
def hooked():
    """An app whose operator allows webhooks to the receiver's /hooks/, over the gated engine; and the receiver."""
    receiver = Receiver()
    engines = []

    def factory(settings):
        engines.append(GatedEngine(settings))
        return engines[0]

    settings = hook_settings(receiver)
    with TestClient(create_app(settings, factory)) as client:
        wait_ready(client)
        yield client, engines[0], receiver
    receiver.server.shutdown()


@pytest.fixture
def hooks(hooked):
    client, engine, receiver = hooked
    with receiver.got:
        receiver.requests.clear()
        receiver.statuses.clear()
    yield client, engine, receiver
    wait_idle(client)


def delivered(client, job_id: str, event: str = "completed", timeout_s: float = 30.0) -> dict:
    """The job's state once the event's delivery is over (delivered or given up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job_id}").json()
        outcome = state.get("webhook", {}).get("deliveries", {}).get(event)
        if outcome and not outcome["pending"]:
            return state
        time.sleep(0.02)
    raise AssertionError(f"webhook {event} of {job_id} still pending: {state}")


def test_webhooks_are_off_by_default_and_never_on_a_synchronous_inference(client):
    hook = {"webhook_url": "https://hooks.example.com/flux"}
    for response in (
        client.post("/v1/jobs", json={**SMALL, **hook}),
        client.post("/inference", data={**SMALL, **hook}, headers={"Prefer": "respond-async"}),
    ):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["details"][0]["field"] == "webhook_url"
        assert "operator has not enabled" in error["message"]
    sync = client.post("/inference", json={**SMALL, **hook})  # not a job: a field /inference does not take
    assert sync.status_code == 422 and sync.json()["error"]["details"][0]["field"] == "webhook_url"
    assert "Prefer: respond-async" in sync.json()["error"]["message"]
    assert client.get("/health").json()["queue"]["depth"] == 0


def test_a_succeeded_job_posts_its_signed_state_with_the_image(hooks):
    client, _, receiver = hooks
    job = submit(client, {**SMALL, "seed": 3, "webhook_url": f"{receiver.base}/hooks/flux?job=1"})
    assert job["webhook"] == {"url": f"{receiver.base}/hooks/flux?job=1", "events": ["completed"], "deliveries": {}}
    ((path, headers, body),) = receiver.wait(1)
    assert path == "/hooks/flux?job=1" and headers["content-type"] == "application/json"
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body.replace(b'"succeeded"', b'"failed"'))
    assert headers["webhook-id"] == f"{job['id']}_completed"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    payload = json.loads(body)
    assert payload["id"] == job["id"] and payload["status"] == "succeeded"
    assert decode_b64_image(payload["result"]["images"][0]["image"]).size == (256, 256)
    state = delivered(client, job["id"])
    assert state["webhook"]["deliveries"]["completed"] == {
        "delivered": True, "pending": False, "attempts": 1, "status_code": 200, "error": None
    }  # fmt: skip
    del state["webhook"]["deliveries"]
    assert payload == state  # the body is what GET /v1/jobs/{id} answers


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/hooks/",  # another port
        "http://evil.example/hooks/",
        "PREFIX/../admin",
        "PREFIX/x/%2f..%2fadmin",
        "ftp://127.0.0.1/hooks/",
        "/hooks/relative",
        42,
    ],
)
def test_a_url_outside_the_allowed_prefixes_is_a_422_naming_webhook_url(hooks, url):
    client, _, receiver = hooks
    if isinstance(url, str):
        url = url.replace("PREFIX", f"{receiver.base}/hooks")
    response = client.post("/v1/jobs", json={**SMALL, "webhook_url": url})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == "webhook_url"
    bad_events = client.post(
        "/v1/jobs", json={**SMALL, "webhook_url": f"{receiver.base}/hooks/", "webhook_events": ["output"]}
    )
    assert bad_events.status_code == 422 and bad_events.json()["error"]["details"][0]["field"] == "webhook_events"
    assert client.post("/v1/jobs", json={**SMALL, "webhook_event": ["start"]}).status_code == 422  # still forbid
    assert not receiver.requests


def test_a_receiver_answering_500_then_200_gets_it_on_the_retry(hooks):
    client, _, receiver = hooks
    receiver.statuses = [500]
    job = submit(client, {**SMALL, "webhook_url": f"{receiver.base}/hooks/retry"})
    first, second = receiver.wait(2)
    assert first[1]["webhook-id"] == second[1]["webhook-id"] and first[2] == second[2]
    assert verify(SECRET, second[1], second[2])
    outcome = delivered(client, job["id"])["webhook"]["deliveries"]["completed"]
    assert outcome["delivered"] and outcome["attempts"] == 2 and outcome["status_code"] == 200


def test_a_failed_job_still_notifies(hooks):
    client, engine, receiver = hooks
    engine.fail_next = True
    job = submit(client, {**SMALL, "webhook_url": f"{receiver.base}/hooks/"})
    ((_, headers, body),) = receiver.wait(1)
    assert verify(SECRET, headers, body)
    payload = json.loads(body)
    assert payload["status"] == "failed" and payload["error"]["type"] == "out_of_memory"
    assert delivered(client, job["id"])["status"] == "failed"


def test_start_and_completed_events_from_form_fields_on_inference_come_in_order(hooks):
    client, _, receiver = hooks
    form = {"prompt": "two events", "steps": "2", "width": "256", "height": "256"}
    form |= {"webhook_url": f"{receiver.base}/hooks/", "webhook_events": "start,completed"}
    files = {"image": ("in.png", image_bytes(300, 200), "image/png")}
    response = client.post("/inference", data=form, files=files, headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    start, done = (json.loads(body) for _, _, body in receiver.wait(2))
    assert start["status"] == "running" and start["progress"]["step"] == 1
    assert done["status"] == "succeeded" and done["result"]["mode"] == "edit"
    state = delivered(client, response.json()["id"])
    assert set(state["webhook"]["deliveries"]) == {"start", "completed"}


def test_redirects_are_not_followed_and_an_unreachable_receiver_never_fails_the_job(hooks, monkeypatch):
    client, _, receiver = hooks
    receiver.statuses = [302]
    job = submit(client, {**SMALL, "webhook_url": f"{receiver.base}/hooks/moved"})
    outcome = delivered(client, job["id"])["webhook"]["deliveries"]["completed"]
    assert not outcome["delivered"] and outcome["attempts"] == 1 and "redirects" in outcome["error"]
    assert len(receiver.wait(1)) == 1
    monkeypatch.setattr(async_jobs.Webhooks, "backoff_s", 0.01)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    settings = {"webhook_allowed_prefixes": [f"http://127.0.0.1:{dead}/"], "webhook_secret": SECRET}
    with make_client(**settings, webhook_retries=1) as other:
        wait_ready(other)
        job = submit(other, {**SMALL, "webhook_url": f"http://127.0.0.1:{dead}/x"})
        state = delivered(other, job["id"])
        assert state["status"] == "succeeded"
        outcome = state["webhook"]["deliveries"]["completed"]
        assert not outcome["delivered"] and outcome["attempts"] == 2 and outcome["status_code"] is None
        assert "Connect" in outcome["error"]


def test_webhook_settings_come_from_the_environment_and_need_a_secret(monkeypatch):
    monkeypatch.setenv("FLUX_WEBHOOK_ALLOWED_PREFIXES", '["https://hooks.example.com/"]')
    with pytest.raises(ValidationError, match="FLUX_WEBHOOK_SECRET"):
        Settings(model="tiny")
    monkeypatch.setenv("FLUX_WEBHOOK_SECRET", SECRET)
    settings = Settings(model="tiny")
    assert settings.webhook_allowed_prefixes == ["https://hooks.example.com/"]
    assert settings.webhook_timeout_s == 10 and settings.webhook_retries == 2
    assert SECRET not in repr(settings)
    monkeypatch.setenv("FLUX_WEBHOOK_ALLOWED_PREFIXES", "https://hooks.example.com")  # no '/': other hosts match
    with pytest.raises(ValidationError, match="cannot match another host"):
        Settings(model="tiny")


def test_an_async_inference_is_counted_under_the_route_that_served_it():
    with make_client() as client:
        wait_ready(client)
        response = client.post("/inference", json=SMALL, headers={"Prefer": "respond-async"})
        assert response.status_code == 202
        assert 'flux_requests_total{endpoint="/v1/jobs",status="202"} 1.0' in client.get("/metrics").text


def test_a_drain_waits_for_a_finished_jobs_webhook_still_retrying():
    """The job is done before the drain starts; its completed webhook, on its retry after the receiver's 500, is
    still an answer owed: the drain returns once it is delivered, not while it waits out the backoff."""
    receiver = Receiver()
    receiver.statuses = [500]
    settings = hook_settings(receiver)
    try:
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
            job = submit(client, {**SMALL, "webhook_url": f"{receiver.base}/hooks/drain"})
            assert poll(client, job["id"])["status"] == "succeeded"
            receiver.wait(1)  # the first attempt got its 500; the retry comes after the backoff
            service = client.app.state.service
            client.portal.call(service.drain, 10.0)
            outcome = client.get(f"/v1/jobs/{job['id']}").json()["webhook"]["deliveries"]["completed"]
            assert outcome["delivered"] and outcome["attempts"] == 2 and not outcome["pending"], outcome
    finally:
        receiver.server.shutdown()
