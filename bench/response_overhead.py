"""Service overhead of one response (issue 11: ``total`` minus ``engine_total`` at most 40 ms for a 1024² PNG of a
natural-looking image), through the service over HTTP, by phase.

The service runs in this process (uvicorn in a thread, the tiny model); the engine's images are swapped for
natural-looking ones of the same size before the response path sees them (random weights give noise, PNG's worst
case), so the encoders do the work a real image asks for. Requests one at a time, 1024² text-to-image, 1 step;
for each PNG encoder (FLUX_PNG_ENCODER) and JPEG: the response's ``total - engine_total`` (the service overhead),
its ``encoding`` phase, what is left (``other``: the hand-over, the response model), and what the client waited
beyond ``total`` (the JSON rendered, sent and read). Medians of --requests. CPU is enough: it is all host work.

    python bench/response_overhead.py --out bench/results/response-overhead-<host>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.encode import cpu_model, natural_image  # noqa: E402
from bench.queue_gap import serve_in_thread  # noqa: E402
from flux_kontext.engine import Engine  # noqa: E402
from flux_kontext.png_fast import available_cpus  # noqa: E402
from flux_kontext.service import create_app  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402


@functools.lru_cache(maxsize=8)
def cached_natural_image(width: int, height: int, seed: int):
    return natural_image(width, height, seed)


class NaturalImagesEngine(Engine):
    """The serving engine, its output images replaced by natural-looking ones of the same size, made once (the
    first, uncounted request makes them): the swap costs the counted requests nothing."""

    def generate(self, job):
        result = super().generate(job)
        images = [cached_natural_image(image.width, image.height, i) for i, image in enumerate(result.images)]
        return dataclasses.replace(result, images=images)


def measure(settings: Settings, body: dict, requests: int, port: int) -> dict:
    server, thread, base = serve_in_thread(create_app(settings, NaturalImagesEngine), port)
    rows = []
    try:
        with httpx.Client(base_url=base, timeout=600) as client:
            for i in range(requests + 1):  # the first (allocations, thread pools) is not counted
                start = time.perf_counter()
                response = client.post("/inference", json=body)
                waited_ms = (time.perf_counter() - start) * 1000.0
                response.raise_for_status()
                out = response.json()
                timings = out["timings_ms"]
                overhead = timings["total"] - timings["engine_total"]
                if i:
                    rows.append(
                        {
                            "overhead_ms": overhead,
                            "encoding_ms": timings["encoding"],
                            "other_ms": overhead - timings["encoding"],
                            "after_total_ms": waited_ms - timings["total"],
                            "bytes": len(response.content),
                        }
                    )
            encoders = sorted({image["encoder"] for image in out["images"]})
            encoding = client.get("/health").json()["encoding"]
    finally:
        server.should_exit = True
        thread.join(30)
    return {
        "encoders": encoders,
        "health_encoding": encoding,
        **{key: round(statistics.median(row[key] for row in rows), 2) for key in rows[0]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--port", type=int, default=8441)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    body = {"prompt": "a boat", "width": args.size, "height": args.size, "steps": 1}
    cases = [
        ("png, png_fast", {"png_encoder": "fast"}, {"output_format": "png"}),
        ("png, pillow", {"png_encoder": "pillow"}, {"output_format": "png"}),
        ("jpeg q95", {}, {"output_format": "jpeg"}),
    ]
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "cpu_model": cpu_model(),
        "cpus_available": available_cpus(),
        "size": args.size,
        "cases": {},
    }
    for n, (name, settings, fields) in enumerate(cases):
        settings = Settings(model="tiny", device="cpu", warmup=False, **settings)  # the engine only feeds the path
        result["cases"][name] = measure(settings, {**body, **fields}, args.requests, args.port + n)
        print(name, json.dumps(result["cases"][name]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
