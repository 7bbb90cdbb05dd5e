"""Reliability under load, against a live server on loopback (the tiny model, CPU is enough):

1. ``load``: N clients for D seconds, a mix of edits and text-to-image; accepted, 429s, other errors, latency
   p50/p95/p99 of the accepted, mismatches (seeded requests repeated under load must give the bytes they gave alone),
   the server's RSS every 30 s.
2. ``sigterm``: a burst of requests, SIGTERM to ``serve`` while they are queued: every request answered 200 or the
   503 envelope (none dropped), the exit status and time.
3. ``flood``: 32 and 128 concurrent maximal bodies (a ~28 MiB base64 image in JSON), with the default
   FLUX_MAX_BODY_MB_IN_FLIGHT, and 32 with the bound lifted: statuses and the server's peak RSS.

    python bench/load.py --clients 64 --duration 120 --out bench/results/load-cpu-<date>.json

Results: RELIABILITY.md. Each phase starts its own server (``python flux_kontext_optimized.py serve``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.live_server import live_process  # noqa: E402  (the tests' server helper: one way to start it)

MIB = 2**20


def png_b64(width: int, height: int, noise: bool = False, seed: int = 0) -> str:
    if noise:
        image = Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (30 + seed * 40 % 200, 120, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


def request_mix() -> list[dict]:
    """Cheap requests of both modes (2 steps, 256-512 px), seeded so that each has one right answer."""
    edits = [
        {"prompt": f"edit {i}", "image": png_b64(320, 240, seed=i), "width": 256, "height": 256, "steps": 2}
        for i in range(3)
    ]
    text = [{"prompt": f"text {i}", "width": 256 + 128 * i, "height": 256, "steps": 2} for i in range(3)]
    return [{**body, "seed": 1000 + n} for n, body in enumerate(edits + text)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1) if len(values) > 1 else values[0]


class RssSampler:
    """The server process's RSS: a sample every ``every_s`` (kept) and the peak (sampled every 50 ms)."""

    def __init__(self, pid: int, every_s: float):
        self.process, self.every_s = psutil.Process(pid), every_s
        self.samples: list[tuple[float, float]] = []
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        next_sample = start
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            now = time.monotonic()
            if now >= next_sample:
                self.samples.append((round(now - start, 1), round(rss / MIB, 1)))
                next_sample += self.every_s
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


async def load_phase(base: str, pid: int, clients: int, duration_s: float) -> dict:
    mix = request_mix()
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=None)) as http:
        reference = {}
        for n, body in enumerate(mix):  # alone first: the bytes each seeded request must give under load
            response = await http.post("/inference", json=body)
            response.raise_for_status()
            reference[n] = response.json()["images"][0]["image"]
        statuses, latencies_ms, mismatches, other = Counter(), [], 0, Counter()
        deadline = time.monotonic() + duration_s

        async def client(number: int) -> None:
            nonlocal mismatches
            rng = random.Random(number)
            while time.monotonic() < deadline:
                n = rng.randrange(len(mix))
                start = time.perf_counter()
                try:
                    response = await http.post("/inference", json=mix[n])
                except httpx.HTTPError as exc:
                    statuses["transport_error"] += 1
                    other[type(exc).__name__] += 1
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies_ms.append((time.perf_counter() - start) * 1000.0)
                    mismatches += response.json()["images"][0]["image"] != reference[n]
                elif response.status_code == 429:
                    assert response.headers.get("Retry-After"), "429 without Retry-After"
                    await asyncio.sleep(rng.uniform(0.05, 0.5))  # a polite client backs off a little
                else:
                    other[f"{response.status_code} {response.json()['error']['type']}"] += 1

        with RssSampler(pid, every_s=30.0) as rss:
            await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        "clients": clients,
        "duration_s": duration_s,
        "accepted": statuses[200],
        "rejected_429": statuses[429],
        "other_errors": sum(v for k, v in statuses.items() if k not in (200, 429)),
        "other_error_kinds": dict(other),
        "latency_ms_accepted": {q: percentile(latencies_ms, q) for q in (50, 95, 99)},
        "mismatches": mismatches,
        "rss_mib_every_30s": rss.samples,
        "peak_rss_mib": round(rss.peak / MIB, 1),
    }


async def sigterm_phase(base: str, process, burst: int) -> dict:
    body = {"prompt": "burst", "image": png_b64(320, 240), "width": 256, "height": 256, "steps": 4, "seed": 7}
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=None)) as http:
        tasks = [asyncio.ensure_future(http.post("/inference", json=body)) for _ in range(burst)]
        while (await http.get("/health")).json()["queue"]["depth"] < 4:
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while (ready := await http.get("/health/ready")).status_code == 200 and time.monotonic() < signalled + 5:
            await asyncio.sleep(0.01)
        readiness_503_after_s = round(time.monotonic() - signalled, 2)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes = Counter()
    for result in results:
        if isinstance(result, Exception):
            outcomes[f"transport error {type(result).__name__}"] += 1
        elif result.status_code == 200:
            outcomes["200"] += 1
        else:
            error = result.json().get("error", {})
            envelope = error.get("type") == "shutting_down" and result.headers.get("Retry-After")
            outcomes[f"{result.status_code} {'shutting_down envelope' if envelope else error.get('type')}"] += 1
    exit_status = await asyncio.to_thread(process.wait, 60)
    return {
        "burst": burst,
        "readiness_after_signal": ready.status_code,
        "readiness_503_after_s": readiness_503_after_s,
        "outcomes": dict(outcomes),
        "exit_status": exit_status,
        "exit_after_signal_s": round(time.monotonic() - signalled, 1),
    }


async def flood_phase(base: str, pid: int, count: int, body: bytes) -> dict:
    idle = psutil.Process(pid).memory_info().rss
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=None)) as http:
        with RssSampler(pid, every_s=1.0) as rss:
            results = await asyncio.gather(
                *(http.post("/inference", content=body, headers=headers) for _ in range(count)), return_exceptions=True
            )
        ready = (await http.get("/health/ready")).status_code
    statuses = Counter(
        type(r).__name__
        if isinstance(r, Exception)
        else f"{r.status_code} {r.json()['error']['type']}"
        if r.status_code != 200
        else "200"
        for r in results
    )
    return {
        "bodies": count,
        "body_mib": round(len(body) / MIB, 1),
        "statuses": dict(statuses),
        "idle_rss_mib": round(idle / MIB, 1),
        "peak_rss_mib": round(rss.peak / MIB, 1),
        "peak_minus_idle_mib": round((rss.peak - idle) / MIB, 1),
        "ready_after": ready,
    }


def maximal_body() -> bytes:
    """JSON with a noise PNG whose base64 is just under the default 32 MiB body limit (a valid edit request)."""
    image = png_b64(2700, 2700, noise=True)
    body = {"prompt": "flood", "image": image, "width": 256, "height": 256, "steps": 1, "seed": 3}
    return json.dumps(body).encode()


def machine() -> dict:
    import importlib.metadata as metadata

    versions = {name: metadata.version(name) for name in ("torch", "diffusers", "fastapi", "uvicorn", "httpx")}
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of the load phase")
    parser.add_argument("--burst", type=int, default=24, help="requests in flight at the SIGTERM")
    parser.add_argument("--floods", default="32,128", help="concurrent maximal bodies, comma-separated")
    parser.add_argument(
        "--lifted-floods",
        default="32",
        help="the same with the bound lifted (each admitted maximal body costs ~120 MiB: 128 needs ~15 GiB)",
    )
    parser.add_argument("--phases", default="load,sigterm,flood")
    parser.add_argument("--out", help="write the JSON result here too")
    args = parser.parse_args()
    phases = args.phases.split(",")
    result: dict = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    quiet = {"FLUX_LOG_LEVEL": "WARNING"}
    if "load" in phases:
        with live_process(serve=True, **quiet) as (base, _, process, _):
            result["load"] = asyncio.run(load_phase(base, process.pid, args.clients, args.duration))
            print(json.dumps(result["load"]), flush=True)
    if "sigterm" in phases:
        with live_process(serve=True, FLUX_DRAIN_TIMEOUT_S="5", **quiet) as (base, _, process, _):
            result["sigterm"] = asyncio.run(sigterm_phase(base, process, args.burst))
            print(json.dumps(result["sigterm"]), flush=True)
    if "flood" in phases:
        body = maximal_body()
        result["flood"] = []
        for bound, counts in (("default", args.floods), ("lifted", args.lifted_floods)):
            env = {} if bound == "default" else {"FLUX_MAX_BODY_MB_IN_FLIGHT": "1000000"}
            for count in [int(n) for n in counts.split(",") if n]:
                with live_process(serve=True, **quiet, **env) as (base, _, process, _):
                    flood = asyncio.run(flood_phase(base, process.pid, count, body))
                flood["bodies_in_flight_bound"] = "default" if bound == "default" else "lifted (1000000 MiB)"
                result["flood"].append(flood)
                print(json.dumps(flood), flush=True)
    result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
