"""Host gap between jobs: with a queue of jobs waiting, the time from one job's engine end to the next job's engine
start. The service runs in this process (uvicorn in a thread, the engine's ``generate`` timed at entry and exit);
``--clients`` requests are sent at once and held until every one is queued, so each gap is host work between two
queued jobs while the event loop also answers the finished ones (JSON, base64, PNG encoding in threads). CPU and
the tiny model are enough: the gap is host work.

    python bench/queue_gap.py --out bench/results/queue-gap-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flux_kontext.engine import Engine  # noqa: E402
from flux_kontext.service import create_app  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402


class TimedEngine(Engine):
    """The serving engine, with each job's (start, end) on the GPU worker recorded."""

    spans: list[tuple[float, float]] = []
    gate = threading.Event()  # jobs wait here until the whole burst is queued

    def generate(self, job):
        self.gate.wait()
        start = time.perf_counter()
        try:
            return super().generate(job)
        finally:
            self.spans.append((start, time.perf_counter()))


async def burst(base: str, clients: int, body: dict) -> list[int]:
    """``clients`` requests at once; the first job starts once all are queued (one running, the rest waiting)."""
    TimedEngine.gate.clear()

    async def open_the_gate():
        async with httpx.AsyncClient(base_url=base, timeout=60) as probe:
            while (await probe.get("/health")).json()["queue"]["depth"] < clients:
                await asyncio.sleep(0.01)
        TimedEngine.gate.set()

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        posts = [client.post("/inference", json=body) for _ in range(clients)]
        responses, _ = await asyncio.gather(asyncio.gather(*posts), open_the_gate())
    return [r.status_code for r in responses]


def serve_in_thread(app, port: int) -> tuple[uvicorn.Server, threading.Thread, str]:
    """The app served by uvicorn in a daemon thread, once /health/ready answers 200: (server, thread, base URL).
    Stop it with ``server.should_exit = True`` and ``thread.join()``."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{base}/health/ready", timeout=5).status_code == 200:
                return server, thread, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--port", type=int, default=8439)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--png-encoder", choices=("fast", "pillow"), default="fast", help="FLUX_PNG_ENCODER")
    args = parser.parse_args()
    settings = Settings(model="tiny", warmup=False, max_queue=args.clients, png_encoder=args.png_encoder)
    server, thread, base = serve_in_thread(create_app(settings, TimedEngine), args.port)
    body = {"prompt": "a boat", "width": args.size, "height": args.size, "steps": 1, "output_format": "png"}
    asyncio.run(burst(base, 2, body))  # first calls (allocations, lazy imports) out of the measurement
    gaps, statuses = [], []
    for _ in range(args.rounds):
        TimedEngine.spans.clear()
        statuses += asyncio.run(burst(base, args.clients, body))
        spans = sorted(TimedEngine.spans)
        gaps += [(spans[i + 1][0] - spans[i][1]) * 1000.0 for i in range(len(spans) - 1)]
        job_ms = statistics.median((end - start) * 1000.0 for start, end in spans)
    server.should_exit = True
    thread.join(30)
    gaps.sort()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "clients": args.clients,
        "rounds": args.rounds,
        "size": args.size,
        "png_encoder": args.png_encoder,
        "statuses": sorted(set(statuses)),
        "median_job_ms": round(job_ms, 1),
        "gaps_ms": {
            "n": len(gaps),
            "median": round(statistics.median(gaps), 3),
            "p90": round(gaps[int(0.9 * (len(gaps) - 1))], 3),
            "max": round(gaps[-1], 3),
        },
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
