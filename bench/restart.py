"""Start to ready, cold and again on a kept compile cache (FLUX_COMPILE_CACHE_DIR): the service started as users
start it (uvicorn), /health polled until 200, its start-up phases, compile-cache and start-up decisions reports
recorded (the service's log beside --out, one per start), then stopped; --starts times over the same cache
directory. After ready, each start sends the requests that warm-up may skip on a hit (FLUX_WARMUP_SKIP_CACHED: a
1024² text-to-image, a 1024² edit with use_cuda_graphs, use_dpm_solver and use_flash_attention off) and records
whether any of them compiled (/health shapes.compiled_after_ready: it must stay at 0 requests). Run on the GPU:

    FLUX_MODEL=random python bench/restart.py --cache-dir /tmp/flux-cache --out bench/results/restart-<gpu>.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flux_kontext.wait_ready import NotReady, wait_ready  # noqa: E402

STEPS = 4


def after_ready_requests(base: str) -> dict:
    """The shapes and switches a skipped warm-up generation stood for, once each; then what compiled after ready."""
    import httpx
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1024, 1024), (90, 120, 150)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    requests = {
        "text_to_image": {"prompt": "a boat", "width": 1024, "height": 1024},
        "edit use_cuda_graphs=false": {"prompt": "make it red", "image": image, "use_cuda_graphs": False},
        "edit use_dpm_solver=false": {"prompt": "make it red", "image": image, "use_dpm_solver": False},
        # warmed in one step: its code compiled or reloaded before ready, its CUDA graphs captured by this request
        "edit use_flash_attention=false": {"prompt": "make it red", "image": image, "use_flash_attention": False},
    }
    seconds = {}
    for name, body in requests.items():
        start = time.monotonic()
        response = httpx.post(f"{base}/inference", json={**body, "steps": STEPS, "seed": 1}, timeout=300)
        seconds[name] = round(time.monotonic() - start, 2) if response.status_code == 200 else response.status_code
    health = httpx.get(f"{base}/health", timeout=30).json()
    return {"request_seconds": seconds, "compiled_after_ready": health["shapes"]["compiled_after_ready"]}


def one_start(cache_dir: Path, timeout_s: float, port: int, log_path: Path) -> dict:
    env = {**os.environ, "FLUX_COMPILE_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "uvicorn", "flux_kontext_optimized:app", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    started = time.monotonic()
    with log_path.open("w") as log_file:  # the service's log: each start phase, the stack's reports
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            health = wait_ready(f"http://127.0.0.1:{port}", process, timeout_s, poll_s=0.5)
            ready_s = time.monotonic() - started
            after = after_ready_requests(f"http://127.0.0.1:{port}")
        except NotReady as exc:
            return {"ready": False, "why": str(exc), "log": log_path.name}
        finally:
            stop(process)
    compile_report = next(r for r in health["optimizations"] if r["name"] == "compile")
    return {
        "ready": True,
        "seconds_to_ready": round(ready_s, 1),
        "startup_seconds": health.get("startup_seconds"),
        "startup_bytecode": health.get("startup_bytecode"),  # Python bytecode kept in the cache dir (or why not)
        "compile_cache": compile_report["data"].get("cache"),
        "compile_status": compile_report["status"],
        "graphs_compiled": compile_report["data"].get("graphs_compiled"),
        "startup_decisions": (health.get("startup_decisions") or {}).get("decisions"),
        "optimization_seconds": {r["name"]: r["seconds"] for r in health["optimizations"] if r["seconds"] >= 0.05},
        "warmed": health.get("shapes", {}).get("warmed"),
        "warmup": health.get("shapes", {}).get("warmup"),  # what warm-up ran and skipped (warmup_record.py)
        **after,
        "log": log_path.name,
    }


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the service drains), then SIGKILL if it has not exited within 30 s."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for index in range(args.starts):
        log_path = args.out.with_name(f"{args.out.stem}-start{index + 1}.log")
        rows.append({"start": index + 1, **one_start(args.cache_dir, args.timeout_s, args.port, log_path)})
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "starts": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
