"""Waiting for a started service to turn ready: poll ``/health`` until it answers 200. One loop for everything that
starts the service as a process and waits on it (benches, the live-server tests)."""

from __future__ import annotations

import subprocess
import time

import httpx


class NotReady(RuntimeError):
    """The service exited, reported a failed start, or was not ready in time (the message says which)."""


def wait_ready(
    base: str,
    process: subprocess.Popen | None = None,
    timeout_s: float = 300.0,
    seen: list[int] | None = None,
    poll_s: float = 0.2,
) -> dict:
    """Poll ``{base}/health`` until 200; returns that /health body. ``seen`` collects every status answered on the
    way (503 while loading, say). Raises NotReady when ``process`` exits, /health says the engine failed, or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    statuses = seen if seen is not None else []
    while True:
        if process is not None and process.poll() is not None:
            raise NotReady(f"the service exited with status {process.returncode}; statuses seen: {statuses}")
        if time.monotonic() > deadline:
            raise NotReady(f"not ready within {timeout_s:g} s; statuses seen: {statuses}")
        try:
            response = httpx.get(f"{base}/health", timeout=5)
        except httpx.TransportError:  # not listening yet
            time.sleep(poll_s)
            continue
        statuses.append(response.status_code)
        if response.status_code == 200:
            return response.json()
        body = _json(response)
        if body.get("state") == "failed":
            raise NotReady(f"the service failed to start: {body.get('reason')}")
        time.sleep(poll_s)


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
