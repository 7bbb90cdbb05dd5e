"""A client that leaves: its job stopped, one log line (no traceback), counted as 499 in /metrics."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import image_b64
from tests.live_server import live_process

# About 5 s of denoising on the tiny model on CPU (50 steps, a 1024² output with its context image).
SLOW = {"prompt": "slow", "image": image_b64(512, 512), "steps": 50, "scheduler": "euler"}


def test_a_disconnect_is_one_log_line_and_counted_499():
    with live_process() as (base, _, _, output):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/inference", json=SLOW, headers={"X-Request-ID": "leaver-1"}, timeout=0.5)
        deadline = time.monotonic() + 30
        while 'status="499"' not in (metrics := httpx.get(f"{base}/metrics", timeout=5).text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        assert 'flux_requests_total{endpoint="/inference",status="499"} 1.0' in metrics
        assert 'endpoint="/inference",status="500"' not in metrics
        while httpx.get(f"{base}/health", timeout=5).json()["queue"]["depth"]:  # the job is stopped
            assert time.monotonic() < deadline
            time.sleep(0.05)
        log = output()
    lines = [line for line in log.splitlines() if "disconnected" in line]
    assert len(lines) == 1, log
    assert "[leaver-1]" in lines[0] and "499" in lines[0] and "job was stopped" in lines[0]
    assert "Traceback" not in log and "CancelledError" not in log, log
