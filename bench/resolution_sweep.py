"""Every preferred resolution, edit and text-to-image, through the running service over HTTP: the first request at
each shape and its repeat, after /health turned 200. A compile stall shows twice: as the first request's extra
time over its repeat, and in /health's ``shapes.compiled_after_ready`` (graphs compiled by requests after ready).
Also num_images 1-4 at 1024², and the steady-state ms/step at 1024² (edit and text-to-image, the first-block cache
off so that every step computes).

The service is started here as users start it (uvicorn, the environment's FLUX_* settings, fresh Inductor/Triton
caches unless FLUX_COMPILE_CACHE_DIR is set). On the GPU:

    FLUX_MODEL=random python bench/resolution_sweep.py --out bench/results/resolution-sweep-h200.json

On the CPU (tiny model, a smoke test of the script): FLUX_MODEL=tiny python bench/resolution_sweep.py --limit 2
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.metadata
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.restart import stop  # noqa: E402
from flux_kontext.resolution import PREFERRED_KONTEXT_RESOLUTIONS  # noqa: E402
from flux_kontext.wait_ready import NotReady, wait_ready  # noqa: E402

HOT = (1024, 1024)


@contextlib.contextmanager
def service(port: int, timeout_s: float, log_path: Path):
    """uvicorn with the tiny/random model from the environment; yields (base URL, seconds to ready, /health)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    caches = None
    if "FLUX_COMPILE_CACHE_DIR" not in env:  # fresh compile caches: the honest first start
        caches = tempfile.TemporaryDirectory(prefix="sweep-caches-")
        env["TORCHINDUCTOR_CACHE_DIR"] = f"{caches.name}/inductor"
        env["TRITON_CACHE_DIR"] = f"{caches.name}/triton"
    command = [sys.executable, "-m", "uvicorn", "flux_kontext_optimized:app", "--host", "127.0.0.1"]
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen([*command, "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            health = wait_ready(base, process, timeout_s, poll_s=0.5)
        except NotReady as exc:
            raise RuntimeError(f"{exc} (see {log_path})") from None
        yield base, time.monotonic() - started, health
    finally:
        stop(process)
        if caches is not None:
            caches.cleanup()


def image_b64(width: int, height: int) -> str:
    """A smooth gradient (a natural-looking input; its content does not change the work, its size does)."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def compiled_after_ready(client: httpx.Client) -> int:
    shapes = client.get("/health").json()["shapes"]["compiled_after_ready"]
    return sum(shapes["graphs_by_shape"].values())


def one(client: httpx.Client, body: dict) -> dict:
    before = compiled_after_ready(client)
    start = time.perf_counter()
    response = client.post("/inference", json=body)
    wall_ms = (time.perf_counter() - start) * 1000.0
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:500]}")
    result = response.json()
    timings = result["timings_ms"]
    return {
        "wall_ms": round(wall_ms, 1),
        "engine_ms": timings["engine_total"],
        "denoising_ms": timings["denoising"],
        "image_encoding_ms": timings["image_encoding"],
        "decoding_ms": timings["decoding"],
        "steps": result["steps"],
        "cuda_graphs": result.get("cuda_graphs"),
        "graphs_compiled": compiled_after_ready(client) - before,
        "size": [result["images"][0]["width"], result["images"][0]["height"]],
    }


def request(mode: str, width: int, height: int, steps: int, num_images: int = 1) -> dict:
    body = {
        "prompt": "a lighthouse on a cliff at dusk",
        "seed": 7,
        "steps": steps,
        "num_images": num_images,
        "cache_threshold": 0,  # every step computes: the first-block cache does not blur the comparison
        "output_format": "jpeg",  # the host's encoding is not what this measures
    }
    if mode == "edit":
        body["image"] = image_b64(width, height)  # at a preferred resolution: snapped to itself
    else:
        body.update(width=width, height=height)
    return body


def first_and_repeat(client: httpx.Client, mode: str, width: int, height: int, steps: int, num_images: int) -> dict:
    body = request(mode, width, height, steps, num_images)
    first, repeat = one(client, body), one(client, body)
    row = {"mode": mode, "width": width, "height": height, "num_images": num_images, "first": first, "repeat": repeat}
    row["first_over_repeat_ms"] = round(first["engine_ms"] - repeat["engine_ms"], 1)
    row["compile_stall"] = first["graphs_compiled"] + repeat["graphs_compiled"] > 0
    print(json.dumps({k: row[k] for k in ("mode", "width", "height", "num_images", "first_over_repeat_ms")}))
    return row


def steady_state(client: httpx.Client, steps: int) -> dict:
    """ms per step at 1024² (best of 3), every step computed."""
    out = {}
    for mode in ("edit", "text_to_image"):
        runs = [one(client, request(mode, *HOT, steps)) for _ in range(3)]
        out[mode] = {
            "ms_per_step": round(min(r["denoising_ms"] for r in runs) / steps, 2),
            "engine_ms": min(r["engine_ms"] for r in runs),
            "decoding_ms": min(r["decoding_ms"] for r in runs),
            "image_encoding_ms": min(r["image_encoding_ms"] for r in runs),
        }
    return out


def versions() -> dict:
    found = {}
    for package in ("torch", "diffusers", "torchao", "triton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=3, help="steps per sweep request")
    parser.add_argument("--steady-steps", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N preferred resolutions (smoke test)")
    parser.add_argument("--port", type=int, default=8437)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "resolution-sweep-service.log")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the service (finally, below)
    resolutions = list(PREFERRED_KONTEXT_RESOLUTIONS)[: args.limit]
    result: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}
    result["settings"] = {k: v for k, v in os.environ.items() if k.startswith("FLUX_")}
    result["versions"] = versions()

    def save() -> None:
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1))

    with service(args.port, args.timeout_s, args.log) as (base, ready_s, health):
        result.update(
            seconds_to_ready=round(ready_s, 1),
            device=health["device"],
            startup_seconds=health["startup_seconds"],
            warmup_seconds=health["warmup_seconds"],
            shapes_at_ready=health["shapes"],
            optimizations={r["name"]: r["status"] for r in health["optimizations"]},
        )
        save()
        with httpx.Client(base_url=base, timeout=args.timeout_s) as client:
            rows = result["rows"] = []
            for width, height in resolutions:
                for mode in ("edit", "text_to_image"):
                    rows.append(first_and_repeat(client, mode, width, height, args.steps, 1))
                    save()
            for num_images in (2, 3, 4):
                for mode in ("edit", "text_to_image"):
                    rows.append(first_and_repeat(client, mode, *HOT, args.steps, num_images))
                    save()
            result["steady_state_1024"] = steady_state(client, args.steady_steps)
            health = client.get("/health").json()
            result["shapes_after"] = health["shapes"]
            graphs = next(r for r in health["optimizations"] if r["name"] == "cuda_graphs")
            result["cuda_graphs_after"] = graphs["data"]
    overheads = [row["first_over_repeat_ms"] for row in result["rows"]]
    result["summary"] = {
        "rows": len(overheads),
        "worst_first_over_repeat_ms": max(overheads),
        "rows_over_1000_ms": sum(o > 1000 for o in overheads),
        "compile_stalls": sum(row["compile_stall"] for row in result["rows"]),
    }
    save()
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
