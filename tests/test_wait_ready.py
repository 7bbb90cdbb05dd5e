"""Waiting on a started service (flux_kontext/wait_ready.py): what it says when the service never gets ready."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flux_kontext.wait_ready import NotReady, wait_ready
from tests.live_server import free_port


def test_a_service_that_exits_before_ready_is_reported_with_its_exit_status():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    with pytest.raises(NotReady, match="exited with status 3"):
        wait_ready(f"http://127.0.0.1:{free_port()}", process, timeout_s=30)


def test_nothing_listening_is_not_ready_once_the_time_is_up():
    with pytest.raises(NotReady, match=r"not ready within 0\.5 s; statuses seen: \[\]"):
        wait_ready(f"http://127.0.0.1:{free_port()}", timeout_s=0.5, poll_s=0.05)
