"""Memory tiers: the service started under simulated GPU capacities, one after another in one process, over HTTP.

For each capacity (GiB; 0 = uncapped) the CUDA allocator is capped with ``torch.cuda.set_per_process_memory_fraction``
and the memory plan is told the same budget (FLUX_GPU_MEMORY_GIB); then the app (flux_kontext.service.create_app,
FLUX_MODEL=random by default, the settings of the environment: FLUX_COMPILE, FLUX_WARMUP_SHAPES, ...) is served by
uvicorn on a local port and measured through HTTP only: ready or not (and why), the plan /health reports (tier,
placements, bytes), time to ready, peak host RSS until ready (sampled every 50 ms) and peak GPU memory, then a 1024²
edit and a 1024² text-to-image (a short run first, then the timed one: end to end and per step). At the capacities of
``--walk-caps`` it then walks what the independent check sends: the largest edit (1568x672) at num_images 1-4 and
every preferred resolution's edit at num_images 1, plus the OpenAI endpoint's ``n`` and an async job above the plan's
limit, recording each status code (a 200, or a 4xx naming the limit; never a 500 or an out-of-memory 503).

One process for every capacity: the imports, Triton's and Inductor's in-memory caches are paid once (the first
capacity pays the cold kernel builds; /health's startup_seconds splits the phases). Between capacities the server
stops, its engine is released and the allocators' caches emptied; the memory left behind is recorded. Capacity is
simulated; the speed is the lent GPU's. On the GPU:

    FLUX_COMPILE=false python bench/memory_tiers.py --caps 16,24,48,0,32 --walk-caps 16,24 --out memory-tiers.json
On the CPU (tiny model; the budget is simulated for the plan only):
    python bench/memory_tiers.py --model tiny --caps 2.54,0 --walk-caps 2.54 --steps 1 --out /tmp/tiers.json
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import sys
import threading
import time
import weakref
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.load import RssSampler, png_b64  # noqa: E402  (the server's RSS, here this process's; test images)
from tests.live_server import free_port  # noqa: E402

GIB = 2**30
PROMPT = "a red fox in the snow"


# ----- HTTP ------------------------------------------------------------------------------------------------------
def call(base: str, path: str, body: dict | None = None, files: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request: GET without a body, a JSON POST, or multipart with ``files``; a
    transport failure is status 0."""
    url = base + path
    try:
        if files is not None:
            response = httpx.post(url, data=body, files=files, timeout=600)
        elif body is not None:
            response = httpx.post(url, json=body, timeout=600)
        else:
            response = httpx.get(url, timeout=10)
    except httpx.TransportError as exc:
        return 0, {"error": {"type": "transport", "message": str(exc)}}
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {}


# ----- one capacity -------------------------------------------------------------------------------------------------
class Served:
    """The app under uvicorn in a thread of this process, for one capacity."""

    def __init__(self, settings):
        import uvicorn

        from flux_kontext.service import create_app

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()

    def wait(self, deadline: float) -> dict:
        """/health once the engine is ready or failed (or the deadline passed)."""
        while time.time() < deadline:
            status, health = call(self.base, "/health")
            if status and health.get("state") in ("ready", "failed"):
                return health
            time.sleep(0.1)
        return call(self.base, "/health")[1] | {"bench": "deadline passed before ready"}

    def stop(self) -> weakref.ref | None:
        """Stop serving and let go of the model; a weak reference to its pipeline tells whether it was freed.

        FastAPI keeps each endpoint it has classified in a module-level LRU cache (and with it the app's closures,
        the service and the engine): the engine's model is dropped by hand, and those caches cleared."""
        self.server.should_exit = True
        self.thread.join(timeout=120)
        engine = self.app.state.service.engine
        pipe = weakref.ref(engine.model.pipe) if engine.model is not None else None
        engine.model = engine.generation = None
        engine.stack = None
        from fastapi.dependencies import models

        for cached in vars(models).values():
            getattr(cached, "cache_clear", lambda: None)()
        self.app = self.server = None
        return pipe


def generation(base: str, edit: bool, steps: int | None, size=(1024, 1024), num_images: int = 1) -> dict:
    body = {"prompt": PROMPT, "seed": 1, "num_images": num_images, "output_format": "jpeg"}
    if steps is not None:
        body["steps"] = steps
    if edit:
        body["image"] = png_b64(*size)
    else:
        body["width"], body["height"] = size
    started = time.perf_counter()
    status, answer = call(base, "/inference", body)
    row = {"status": status, "http_ms": round((time.perf_counter() - started) * 1000, 1)}
    if status == 200:
        row.update(steps=answer["steps"], timings_ms=answer["timings_ms"], images=len(answer["images"]))
        row["ms_per_step"] = round(answer["timings_ms"]["denoising"] / answer["steps"], 1)
        row["cuda_graphs"] = answer.get("cuda_graphs")
        row["first_block_cache"] = answer.get("first_block_cache")  # skipped steps change the time per step
    else:
        row["error"] = answer.get("error")
    return row


def timed_1024(base: str, steps: int | None, warm_steps: int) -> dict:
    """A short run of each mode (first sight of the shape: kernels, graph capture), then the timed one."""
    out = {}
    for mode, edit in (("edit", True), ("text_to_image", False)):
        first = generation(base, edit, warm_steps)
        out[mode] = generation(base, edit, steps) | {"first_run": first}
    return out


def walk(base: str, steps: int, max_largest: int | None) -> dict:
    """What the independent check sends at low capacities: each answer's status, error type and message."""
    from flux_kontext.memory_plan import LARGEST_REQUEST, MAX_NUM_IMAGES
    from flux_kontext.resolution import PREFERRED_KONTEXT_RESOLUTIONS

    rows = []
    for n in range(1, MAX_NUM_IMAGES + 1):
        rows.append({"size": "x".join(map(str, LARGEST_REQUEST)), "num_images": n})
        rows[-1] |= generation(base, True, steps, LARGEST_REQUEST, n)
    for size in PREFERRED_KONTEXT_RESOLUTIONS:
        if tuple(size) != tuple(LARGEST_REQUEST):
            rows.append({"size": "x".join(map(str, size)), "num_images": 1} | generation(base, True, steps, size))
    for row in rows:
        row.pop("timings_ms", None)
    out = {"inference": rows}
    if max_largest is not None and max_largest < MAX_NUM_IMAGES:  # the other endpoints' refusal of the same request
        above = max_largest + 1
        edit = {"prompt": PROMPT, "image": png_b64(*LARGEST_REQUEST), "steps": steps, "num_images": above}
        status, answer = call(base, "/v1/jobs", edit)
        out["async_job_above_limit"] = {"num_images": above, "status": status, "error": answer.get("error")}
        openai = {"prompt": PROMPT, "n": str(above), "size": "1568x672", "steps": str(steps)}
        png = {"image": ("wide.png", base64.b64decode(edit["image"]), "image/png")}
        status, answer = call(base, "/v1/images/edits", openai, files=png)
        out["openai_edit_above_limit"] = {"n": above, "status": status, "error": answer.get("error")}
    codes: dict[str, int] = {}
    for row in rows:
        codes[str(row["status"])] = codes.get(str(row["status"]), 0) + 1
    out["status_counts"] = codes
    return out


def gpu_now() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {
        "reserved_gib": round(torch.cuda.memory_reserved() / GIB, 2),
        "allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        # The allocator at its cap frees its cache and retries: each retry is a device sync and cudaMalloc again.
        **{k: stats.get(k) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")},
    }


def set_cap(cap_gib: float) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total) if cap_gib else 1.0)
    torch.cuda.reset_peak_memory_stats()
    return round(total / GIB, 1)


def release() -> None:
    """What the last capacity left: Python's cycles, the CUDA allocator's and the pinned host allocator's caches."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()


def run_cap(args, cap: float, deadline: float) -> dict:
    from flux_kontext.loading import host_rss_bytes
    from flux_kontext.settings import Settings

    row: dict = {"cap_gib": cap or None, "left_by_earlier_caps": gpu_now()}
    row["gpu_total_gib"] = set_cap(cap)
    rss_before = host_rss_bytes() or 0
    sampler = RssSampler(os.getpid(), every_s=3600)
    sampler.__enter__()
    started = time.perf_counter()
    served = Served(Settings(model=args.model, gpu_memory_gib=cap or None))
    try:
        health = served.wait(deadline)
        row["seconds_to_ready"] = round(time.perf_counter() - started, 1)
        sampler.__exit__()
        peak_rss = sampler.peak
        plan = health.get("memory_plan") or {}
        row.update(
            state=health.get("state"),
            reason=health.get("reason"),
            startup_seconds=health.get("startup_seconds"),
            host_rss_gib={"before": round(rss_before / GIB, 2), "peak_until_ready": round(peak_rss / GIB, 2)},
            gpu_until_ready=gpu_now(),
            memory_plan=plan,
            optimizations={o["name"]: o["status"] for o in health.get("optimizations", [])},
            cuda_graphs_report=next((o for o in health.get("optimizations", []) if o["name"] == "cuda_graphs"), None),
        )
        if health.get("state") != "ready":
            return row
        if time.time() < deadline:
            row["timed_1024"] = timed_1024(served.base, args.timed_steps, args.warm_steps)
            row["gpu_after_1024"] = gpu_now()
        if cap in args.walk_caps and time.time() < deadline:
            row["walk"] = walk(served.base, args.steps, plan.get("max_num_images_largest_edit"))
            row["gpu_after_walk"] = gpu_now()
            health = call(served.base, "/health")[1]
            graphs = next((o for o in health.get("optimizations", []) if o["name"] == "cuda_graphs"), {})
            row["health_after_walk"] = {"state": health.get("state"), "reason": health.get("reason")}
            row["health_after_walk"]["cuda_graphs"] = {
                k: v for k, v in graphs.get("data", {}).items() if k != "captured_shapes"
            }
        return row
    finally:
        sampler.__exit__()  # again: a no-op
        pipe = served.stop()
        del served
        release()
        row["model_released"] = pipe is None or pipe() is None
        row["left_after_release"] = gpu_now()


def summary(row: dict) -> dict:
    plan = row.get("memory_plan") or {}
    timed = row.get("timed_1024") or {}
    walked = row.get("walk") or {}
    return {
        "cap": row.get("cap_gib"),
        "state": row.get("state"),
        "reason": (row.get("reason") or "")[:160],
        "tier": plan.get("tier"),
        "t5": (plan.get("placements") or {}).get("text_encoder_2"),
        "max_images_largest": plan.get("max_num_images_largest_edit"),
        "s_to_ready": row.get("seconds_to_ready"),
        "rss_peak": (row.get("host_rss_gib") or {}).get("peak_until_ready"),
        "gpu_peak": (row.get("gpu_after_walk") or row.get("gpu_after_1024") or {}).get("peak_reserved_gib"),
        "edit": {k: (timed.get("edit") or {}).get(k) for k in ("status", "ms_per_step")},
        "t2i": {k: (timed.get("text_to_image") or {}).get(k) for k in ("status", "ms_per_step")},
        "walk": walked.get("status_counts"),
    }


def versions() -> dict:
    import diffusers
    import torch

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", default="16,24,48,0,32", help="GiB, comma-separated, in order; 0 = uncapped")
    parser.add_argument("--walk-caps", default="16,24", help="capacities at which to walk the check's requests")
    parser.add_argument("--model", default="random")
    parser.add_argument("--timed-steps", type=int, default=None, help="steps of the timed 1024² runs (default: 14)")
    parser.add_argument("--warm-steps", type=int, default=2, help="steps of the short run before each timed one")
    parser.add_argument("--steps", type=int, default=2, help="steps of each walk request")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no capacity after this long")
    parser.add_argument("--cap-s", type=float, default=240, help="longest one capacity may take to get ready")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.walk_caps = {float(c) for c in args.walk_caps.split(",") if c}

    from flux_kontext.logging_setup import configure_logging

    configure_logging()
    started = time.time()
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    result |= versions()
    result["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("FLUX_", "PYTORCH_CUDA"))}
    for cap in (float(c) for c in args.caps.split(",")):
        left = args.budget_s - (time.time() - started)
        if left < 20:
            result["runs"].append({"cap_gib": cap or None, "skipped": f"out of time ({left:.0f} s left)"})
            continue
        try:
            row = run_cap(args, cap, time.time() + min(left, args.cap_s))
        except Exception as exc:  # one capacity's failure is a finding; the others still run
            row = {"cap_gib": cap or None, "bench_error": f"{type(exc).__name__}: {exc}"[:500]}
        row["bench_seconds"] = round(time.time() - started, 1)
        result["runs"].append(row)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print("SUMMARY", json.dumps(summary(row)), flush=True)
        if "bench_error" not in row and row.get("state") not in ("ready", "failed"):  # its loader may still run
            break
    result["left_at_end"] = gpu_now()
    args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
