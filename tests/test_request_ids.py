"""Request ids (X-Request-ID) on every response, in every error body and log line; logs never hold prompts, image
bytes or API keys; FLUX_LOG_FORMAT=json."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re

import pytest

from flux_kontext.logging_setup import formatter
from flux_kontext.request_id import RequestIdFilter
from tests.conftest import image_b64, wait_ready
from tests.test_faults import make_client

SMALL = {"prompt": "a small test", "width": 256, "height": 256, "steps": 1, "seed": 5}
KEY = "sk-test-0123456789abcdefSECRETKEY"


@contextlib.contextmanager
def captured_logs(log_format: str = "text"):
    """Every record of every logger at DEBUG, formatted as the service formats them (request id included)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_a_valid_request_id_is_echoed_and_a_missing_one_made_up(client):
    response = client.get("/health/live", headers={"X-Request-ID": "trace-42.abc:def"})
    assert response.headers["X-Request-ID"] == "trace-42.abc:def"
    made = client.get("/health/live").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)


@pytest.mark.parametrize("bad", ["x" * 129, "has space", 'quote"d', "new\\nline", "ünïcode", ""])
def test_an_unsafe_request_id_is_replaced_never_echoed(client, bad):
    response = client.get("/health/live", headers={"X-Request-ID": bad.encode("utf-8")})
    echoed = response.headers["X-Request-ID"]
    assert echoed != bad and re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_every_error_body_carries_the_request_id(client):
    cases = [
        ("post", "/inference", {"json": {**SMALL, "width": 1000}}, 422),
        ("post", "/inference", {"content": b"{", "headers": {"Content-Type": "application/json"}}, 422),
        ("get", "/nowhere", {}, 404),
        ("post", "/inference", {"content": b"x" * 40 * 2**20, "headers": {"Content-Type": "application/json"}}, 413),
        ("post", "/v1/images/generations", {"json": {"prompt": ""}}, 400),
    ]
    for number, (method, path, kwargs, status) in enumerate(cases):
        request_id = f"case-{number}"
        headers = {**kwargs.pop("headers", {}), "X-Request-ID": request_id}
        response = getattr(client, method)(path, headers=headers, **kwargs)
        assert response.status_code == status, (path, response.text)
        if not path.startswith("/v1/images"):  # OpenAI's error shape, exactly: the SDKs read the id from the header
            assert response.json()["error"]["request_id"] == request_id, response.text
        assert response.headers["X-Request-ID"] == request_id


def test_log_lines_carry_the_request_id_and_json_logs_are_one_object_a_line():
    with make_client(api_keys=[KEY]) as client, captured_logs("json") as logs:
        wait_ready(client)
        client.post("/inference", json=SMALL, headers={"X-Request-ID": "no-key-7"})
        client.post("/inference", json=SMALL, headers={"X-Request-ID": "keyed-8", "X-API-Key": KEY})
    records = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert all({"time", "level", "logger", "request_id", "message"} <= set(r) for r in records)
    refused = [r for r in records if r["message"].startswith("401 POST /inference")]
    assert refused and all(r["request_id"] == "no-key-7" for r in refused)
    # The GPU worker thread logs under the id of the request whose job it runs.
    generated = [r for r in records if r["logger"] == "flux_kontext.engine" and r["message"].startswith("generated")]
    assert [r["request_id"] for r in generated] == ["keyed-8"]


def test_logs_never_hold_prompts_images_or_api_keys():
    secret_prompt = "TOPSECRET-PROMPT-7f3a a portrait of the chief executive"
    image = image_b64(64, 48)
    settings = {"api_keys": [KEY], "fault_injection": True}
    keyed = {"Authorization": f"Bearer {KEY}"}
    with make_client(**settings) as client, captured_logs() as logs:
        wait_ready(client)
        edit = {"prompt": secret_prompt, "image": image, "steps": 1, "width": 256, "height": 256}
        assert client.post("/inference", json=edit, headers={**keyed, "X-Request-ID": "hygiene-1"}).status_code == 200
        assert client.post("/inference", json={**edit, "width": 1000}, headers=keyed).status_code == 422
        failing = {**keyed, "X-Fault-Inject": "error@denoising:1"}
        text_to_image = {"prompt": secret_prompt, "width": 256, "height": 256, "steps": 1}
        assert client.post("/inference", json=text_to_image, headers=failing).status_code == 500
        assert client.post("/inference", json=edit, headers={"X-API-Key": KEY + "x"}).status_code == 403
        openai = {"prompt": secret_prompt, "size": "256x256", "response_format": "b64_json"}
        assert client.post("/v1/images/generations", json=openai, headers=keyed).status_code == 200
        assert client.post("/v1/jobs", json={**edit, "steps": 0}, headers=keyed).status_code == 422
    text = logs.getvalue()
    assert re.search(r"INFO flux_kontext\.engine \[hygiene-1\]: generated 1 image", text), text
    assert "internal error" in text or "unexpected error" in text  # the fault was logged (with its traceback)
    assert "Traceback" in text
    for secret in ("TOPSECRET", KEY, KEY[:16], image[:40], base64.b64decode(image)[:8].hex()):
        assert secret not in text, secret
