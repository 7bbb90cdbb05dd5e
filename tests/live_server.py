"""A real uvicorn process serving the app (the tiny model), for tests that need real connections."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from flux_kontext.wait_ready import NotReady, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(ready_timeout_s: float = 180, **env: str) -> Iterator[tuple[str, list[int]]]:
    """``uvicorn flux_kontext_optimized:app`` with FLUX_MODEL=tiny and ``env`` on top; yields (base URL, the /health
    statuses seen until it turned 200). Its output goes to a log file, shown if it dies or never gets ready."""
    with live_process(ready_timeout_s, **env) as (base, seen, _, _):
        yield base, seen


@contextlib.contextmanager
def live_process(
    ready_timeout_s: float = 180, serve: bool = False, **env: str
) -> Iterator[tuple[str, list[int], subprocess.Popen, Callable[[], str]]]:
    """As ``live_server``; ``serve``: ``python flux_kontext_optimized.py serve`` (the draining server) instead of
    plain uvicorn. Yields (base URL, /health statuses seen, the process, a function returning its output so far)."""
    port = free_port()
    environment = {**os.environ, "FLUX_MODEL": "tiny", "PYTHONUNBUFFERED": "1", **env}
    if serve:
        command = [sys.executable, "flux_kontext_optimized.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    else:
        command = [sys.executable, "-m", "uvicorn", "flux_kontext_optimized:app", "--host", "127.0.0.1"]
        command += ["--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        base, seen = f"http://127.0.0.1:{port}", []

        def output() -> str:
            log.seek(0)
            return log.read()[-4000:]

        try:
            try:
                wait_ready(base, process, ready_timeout_s, seen, poll_s=0.05)
            except NotReady as exc:
                raise AssertionError(f"{exc}\n{output()}") from None
            yield base, seen, process, output
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
