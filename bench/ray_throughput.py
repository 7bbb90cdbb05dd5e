"""Requests per second through Ray Serve with 1 and 2 replicas of the tiny model on CPUs (issue 16).

A local Ray cluster of --cpus CPUs; each replica reserves one CPU (its torch runs one thread), as a GPU replica
reserves one GPU. For each replica count: deploy, warm up, then --requests /inference requests from --concurrency
clients at once through Ray's HTTP proxy, --bursts times; requests/s per burst (and their median) and the latency
of each request.

    python bench/ray_throughput.py --out bench/results/ray-throughput-cpu-<date>.json

The machine's load average is recorded before and after: on a shared host it is the first thing to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def body(i: int, args: argparse.Namespace) -> dict:
    return {"prompt": f"bench {i}", "seed": i, "width": args.size, "height": args.size, "steps": args.steps}


def burst(base: str, args: argparse.Namespace, first: int, count: int) -> tuple[float, list[float]]:
    """``count`` requests from ``args.concurrency`` clients; returns (wall seconds, per-request seconds)."""

    def post(i: int) -> float:
        start = time.perf_counter()
        response = httpx.post(f"{base}/inference", json=body(i, args), timeout=300)
        response.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        latencies = list(pool.map(post, range(first, first + count)))
    return time.perf_counter() - start, latencies


def measure(replicas: int, base: str, args: argparse.Namespace) -> dict:
    from ray import serve

    from flux_kontext.ray_serve import RayAppArgs, fixed_replicas

    app = fixed_replicas(RayAppArgs(settings={"model": "tiny"}), replicas, max_queued_requests=-1)
    started = time.perf_counter()
    serve.run(app, name="bench", route_prefix="/")
    ready_s = time.perf_counter() - started
    health = httpx.get(f"{base}/health", timeout=60).json()
    burst(base, args, 10_000, args.concurrency)  # warm-up: every replica has served
    rates, latencies = [], []
    for b in range(args.bursts):
        wall_s, burst_latencies = burst(base, args, b * args.requests, args.requests)
        rates.append(round(args.requests / wall_s, 3))
        latencies += burst_latencies
    serve.delete("bench")
    ordered = sorted(latencies)
    return {
        "replicas": replicas,
        "requests_per_burst": args.requests,
        "requests_per_second": statistics.median(rates),
        "requests_per_second_per_burst": rates,
        "latency_s": {
            "median": round(statistics.median(ordered), 3),
            "p95": round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 3),
        },
        "deploy_to_ready_s": round(ready_s, 1),
        "torch_threads_per_replica": health["device"].get("threads"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--requests", type=int, default=16, help="per burst")
    parser.add_argument("--bursts", type=int, default=3, help="per replica count; the median rate is reported")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="output side (text-to-image)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--port", type=int, default=0, help="of Ray's HTTP proxy; 0: a free one")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import ray
    from ray import serve

    if not args.port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    load_before = os.getloadavg()
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        rows = [measure(n, f"http://127.0.0.1:{args.port}", args) for n in args.replicas]
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "host": {"machine": platform.machine(), "cpus_visible": os.cpu_count(), "python": platform.python_version()},
        "versions": {name: version(name) for name in ("ray", "torch", "diffusers")},
        "load_average_1_5_15": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "request": {"mode": "text_to_image", "size": args.size, "steps": args.steps, "concurrency": args.concurrency},
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
