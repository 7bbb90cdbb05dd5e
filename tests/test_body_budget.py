"""Bodies held at once are bounded (FLUX_MAX_BODY_MB_IN_FLIGHT): beyond it, 429 with Retry-After before the body
is read; the budget comes back when the response is sent; bodiless and small requests are not held up."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from flux_kontext.engine import Engine
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from tests.conftest import wait_ready

SMALL = {"prompt": "small body", "width": 256, "height": 256, "steps": 1, "seed": 2}
# About 0.85 MiB of JSON (a cheap text-to-image padded with whitespace): two do not fit a 1.5 MiB budget, one does.
BIG = (json.dumps({**SMALL, "prompt": "big body"}) + " " * 900_000).encode()
JSON = {"Content-Type": "application/json"}


class HeldEngine(Engine):
    """The real engine, whose generations wait until the test opens the gate."""

    gate = threading.Event()

    def _run(self, job):
        self.gate.wait(60)
        return super()._run(job)


@contextlib.contextmanager
def one_big_body_held():
    """An app with a 1.5 MiB budget whose queue holds one BIG request (its body with it) until the gate opens;
    yields (client, pool, the held request's future)."""
    settings = Settings(model="tiny", warmup=False, max_body_mb=1, max_body_mb_in_flight=1.5)
    HeldEngine.gate.clear()
    with TestClient(create_app(settings, HeldEngine)) as client, ThreadPoolExecutor(2) as pool:
        wait_ready(client)
        first = pool.submit(client.post, "/inference", content=BIG, headers=JSON)
        deadline = time.monotonic() + 30
        while not client.get("/health").json()["queue"]["depth"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        try:
            yield client, pool, first
        finally:
            HeldEngine.gate.set()


def test_a_body_that_would_pass_the_bytes_in_flight_gets_429_before_it_is_read_and_the_budget_comes_back():
    with one_big_body_held() as (client, pool, first):
        refused = client.post("/inference", content=BIG, headers=JSON)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["type"] == "overloaded" and "FLUX_MAX_BODY_MB_IN_FLIGHT" in error["message"]
        assert int(refused.headers["Retry-After"]) > 0 and error["request_id"]
        assert client.get("/health/ready").status_code == 200  # bodiless: never held up
        small = pool.submit(client.post, "/inference", json=SMALL)  # fits beside the big one
        HeldEngine.gate.set()
        assert first.result().status_code == 200
        assert small.result().status_code == 200
        assert client.post("/inference", content=BIG, headers=JSON).status_code == 200  # its bytes were given back
        assert 'status="429"' in client.get("/metrics").text


def test_a_chunked_body_is_counted_as_it_arrives():
    with one_big_body_held() as (client, _, first):

        def chunks():  # no Content-Length: the size is only known as the chunks come
            for start in range(0, len(BIG), 64 * 1024):
                yield BIG[start : start + 64 * 1024]

        refused = client.post("/inference", content=chunks(), headers=JSON)
        assert refused.status_code == 429, refused.text
        HeldEngine.gate.set()
        assert first.result().status_code == 200
