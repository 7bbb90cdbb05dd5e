"""API keys (flux_kontext/auth.py): 401/403/200 on every generation route, open probes, info endpoints open or keyed,
hashed key files, the per-key concurrency limit, and keys kept out of logs and responses."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from flux_kontext.engine import Engine
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import make_client

KEY = "test-key-0123456789abcdef"
OTHER = "other-key-fedcba9876543210"
WRONG = "wrong-key-not-configured-000"
SMALL = {"prompt": "a small test", "width": 256, "height": 256, "steps": 1}
OPENAI = {"prompt": "a cat", "size": "256x256", "steps": 1}
BENCH = "/benchmark?runs=1&width=256&height=256&steps=1&mode=text_to_image"
OPENAI_KEYS = {"message", "type", "param", "code"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_ready(client: TestClient, timeout_s: float = 120.0) -> None:
    """Through /health/ready, open whatever the settings (/health may be keyed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("engine did not become ready")


@pytest.fixture(scope="module")
def keyed():
    with make_client(api_keys=[KEY, OTHER]) as client:
        wait_ready(client)
        yield client


def assert_envelope(response, status: int, type_: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_ and error["message"]


def test_no_keys_is_open_as_before_and_says_so_at_start(caplog):
    with caplog.at_level(logging.WARNING, logger="flux_kontext.auth"), make_client() as client:
        wait_ready(client)
        assert client.post("/inference", json=SMALL).status_code == 200
        assert client.get("/metrics").status_code == 200
    assert "unauthenticated" in caplog.text


def test_inference_401_without_key_403_with_wrong_200_with_right(keyed):
    missing = keyed.post("/inference", json=SMALL)
    assert_envelope(missing, 401, "missing_api_key")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert_envelope(keyed.post("/inference", json=SMALL, headers=bearer(WRONG)), 403, "invalid_api_key")
    assert keyed.post("/inference", json=SMALL, headers=bearer(KEY)).status_code == 200
    assert keyed.post("/inference", json=SMALL, headers=bearer(OTHER)).status_code == 200


def test_bearer_and_x_api_key_both_work(keyed):
    assert keyed.post("/inference", json=SMALL, headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.post("/inference", json=SMALL, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert_envelope(keyed.post("/inference", json=SMALL, headers={"X-API-Key": WRONG}), 403, "invalid_api_key")
    # Another scheme is no key at all.
    assert_envelope(
        keyed.post("/inference", json=SMALL, headers={"Authorization": f"Basic {KEY}"}), 401, "missing_api_key"
    )


def test_openai_routes_answer_openai_shape(keyed):
    missing = keyed.post("/v1/images/generations", json=OPENAI)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert set(missing.json()["error"]) == OPENAI_KEYS and missing.json()["error"]["code"] == "missing_api_key"
    wrong = keyed.post("/v1/images/generations", json=OPENAI, headers=bearer(WRONG))
    assert wrong.status_code == 403 and set(wrong.json()["error"]) == OPENAI_KEYS
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert keyed.post("/v1/images/generations", json=OPENAI, headers=bearer(KEY)).status_code == 200
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.get("/v1/models", headers=bearer(KEY)).status_code == 200


def test_jobs_are_keyed(keyed):
    assert_envelope(keyed.post("/v1/jobs", json=SMALL), 401, "missing_api_key")
    assert_envelope(keyed.post("/v1/jobs", json=SMALL, headers=bearer(WRONG)), 403, "invalid_api_key")
    accepted = keyed.post("/v1/jobs", json=SMALL, headers=bearer(KEY))
    assert accepted.status_code == 202, accepted.text
    job_url = accepted.headers["Location"]
    assert keyed.get(job_url).status_code == 401
    assert keyed.get(job_url, headers=bearer(KEY)).status_code == 200
    # Prefer: respond-async on /inference is a job submission, keyed the same way.
    assert keyed.post("/inference", json=SMALL, headers={"Prefer": "respond-async"}).status_code == 401


def test_benchmark_is_keyed(keyed):
    assert_envelope(keyed.get(BENCH), 401, "missing_api_key")
    assert_envelope(keyed.get(BENCH, headers=bearer(WRONG)), 403, "invalid_api_key")
    assert keyed.get(BENCH, headers=bearer(KEY)).status_code == 200


def test_benchmark_can_be_disabled():
    with make_client(benchmark_enabled=False) as client:
        wait_ready(client)
        off = client.get(BENCH)
        assert_envelope(off, 403, "benchmark_disabled")
        assert "FLUX_BENCHMARK_ENABLED=true" in off.json()["error"]["message"]
    with make_client(benchmark_enabled=False, api_keys=[KEY]) as client:
        assert client.get(BENCH).status_code == 401  # the key is checked first
        assert_envelope(client.get(BENCH, headers=bearer(KEY)), 403, "benchmark_disabled")


def test_probes_and_info_endpoints_open_by_default(keyed):
    for path in ("/health/live", "/health/ready", "/health", "/metrics", "/openapi.json", "/docs", "/redoc"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/no-such-route").status_code == 401  # unknown paths are keyed too


def test_info_endpoints_keyed_when_protected():
    with make_client(api_keys=[KEY], auth_protect_info=True) as client:
        wait_ready(client)
        for path in ("/health/live", "/health/ready"):
            assert client.get(path).status_code == 200, path
        for path in ("/health", "/metrics", "/openapi.json", "/docs", "/redoc"):
            assert_envelope(client.get(path), 401, "missing_api_key")
            assert client.get(path, headers=bearer(KEY)).status_code == 200, path


def test_cors_preflight_passes_without_key(keyed):
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    assert keyed.options("/inference", headers=preflight).status_code not in (401, 403)


def test_answered_before_the_body_is_read():
    with make_client(api_keys=[KEY], max_body_mb=0.01) as client:
        big = b"x" * 100_000
        headers = {"Content-Type": "application/json"}
        assert client.post("/inference", content=big, headers=headers).status_code == 401  # not 413
        assert client.post("/inference", content=big, headers={**headers, **bearer(KEY)}).status_code == 413


def test_keys_file_of_hashes(tmp_path):
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# clients\n\nsha256:{digest}  # team a\nSHA256:{'0' * 64}\n")
    with make_client(api_keys_file=str(keys_file)) as client:
        wait_ready(client)
        assert client.post("/inference", json=SMALL).status_code == 401
        assert client.post("/inference", json=SMALL, headers={"X-API-Key": KEY}).status_code == 200
        assert client.post("/inference", json=SMALL, headers={"X-API-Key": OTHER}).status_code == 403


def test_bad_keys_file_and_short_keys_refused_without_echo(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{KEY}\n")  # a key in clear, not its hash
    with pytest.raises(ValueError, match="line 1") as raised:
        Settings(model="tiny", api_keys_file=str(bad))
    assert KEY not in str(raised.value)
    with pytest.raises(ValueError, match="cannot be read"):
        Settings(model="tiny", api_keys_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="16 characters") as raised:
        Settings(model="tiny", api_keys="short-secret")
    assert "short-secret" not in str(raised.value)
    with pytest.raises(ValueError) as raised:  # another field's error does not echo the keys either
        Settings(model="tiny", api_keys=[KEY], device="bogus")
    assert KEY not in str(raised.value)


def test_keys_from_environment_masked_in_repr(monkeypatch):
    monkeypatch.setenv("FLUX_API_KEYS", f"{KEY}, {OTHER}")
    settings = Settings(model="tiny")
    assert len(settings.api_keys) == 2 and len(settings.api_key_digests) == 2
    assert KEY not in repr(settings) and KEY not in str(settings) and OTHER not in repr(settings)
    monkeypatch.setenv("FLUX_API_KEYS", f'["{KEY}"]')
    assert [k.get_secret_value() for k in Settings(model="tiny").api_keys] == [KEY]


class GatedEngine(Engine):
    """The real engine, whose generations wait for the test to open a gate."""

    def __init__(self, settings, run_gate: threading.Event):
        super().__init__(settings)
        self.run_gate = run_gate

    def _run(self, job):
        self.run_gate.wait(30)
        return super()._run(job)


def wait_depth(client: TestClient, depth: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/health").json()["queue"]["depth"] >= depth:
            return
        time.sleep(0.02)
    raise AssertionError(f"queue never reached depth {depth}")


def test_per_key_limit_429_while_another_key_gets_through():
    gate = threading.Event()
    settings = Settings(model="tiny", warmup=False, api_keys=[KEY, OTHER], max_requests_per_key=1, max_queue=8)
    with TestClient(create_app(settings, lambda s: GatedEngine(s, gate))) as client, ThreadPoolExecutor(2) as pool:
        wait_ready(client)
        try:
            first = pool.submit(client.post, "/inference", json=SMALL, headers=bearer(KEY))
            wait_depth(client, 1)
            limited = client.post("/inference", json=SMALL, headers={"X-API-Key": KEY})
            assert_envelope(limited, 429, "too_many_requests_for_key")
            assert int(limited.headers["Retry-After"]) > 0
            openai = client.post("/v1/images/generations", json=OPENAI, headers=bearer(KEY))
            assert openai.status_code == 429 and openai.json()["error"]["type"] == "rate_limit_error"
            other = pool.submit(client.post, "/inference", json=SMALL, headers=bearer(OTHER))
            wait_depth(client, 2)  # the other key's request was admitted into the queue
        finally:
            gate.set()
        assert first.result(30).status_code == 200
        assert other.result(30).status_code == 200
        assert client.post("/inference", json=SMALL, headers=bearer(KEY)).status_code == 200  # released


def test_key_never_in_logs_or_responses(caplog, keyed):
    with caplog.at_level(logging.DEBUG):
        responses = [
            keyed.post("/inference", json=SMALL, headers=bearer(WRONG)),
            keyed.post("/inference", json=SMALL, headers={"X-API-Key": KEY}),
            keyed.post("/v1/images/generations", json=OPENAI, headers=bearer(WRONG)),
            keyed.post("/v1/jobs", json=SMALL, headers=bearer(KEY)),
            keyed.post("/inference", json={"prompt": 3}, headers=bearer(KEY)),  # a validation error
            keyed.get("/health"),
            keyed.get("/metrics"),
        ]
    logged = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    for secret in (KEY, WRONG, hashlib.sha256(KEY.encode()).hexdigest()):
        assert secret not in logged
        for response in responses:
            assert secret not in response.text
            assert all(secret not in value for value in response.headers.values())
