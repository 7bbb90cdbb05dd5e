"""Start to ready, cold and again on a kept compile cache (FLUX_COMPILE_CACHE_DIR): the service started as users
start it (uvicorn), /health polled until 200, its start-up phases, compile-cache and start-up decisions reports
recorded (the service's log beside --out, one per start), then stopped; --starts times over the same cache
directory. Run on the GPU:

    FLUX_MODEL=random python bench/restart.py --cache-dir /tmp/flux-cache --out bench/results/restart-<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flux_kontext.wait_ready import NotReady, wait_ready  # noqa: E402


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
        except NotReady as exc:
            return {"ready": False, "why": str(exc), "log": log_path.name}
        finally:
            stop(process)
    compile_report = next(r for r in health["optimizations"] if r["name"] == "compile")
    return {
        "ready": True,
        "seconds_to_ready": round(ready_s, 1),
        "startup_seconds": health.get("startup_seconds"),
        "compile_cache": compile_report["data"].get("cache"),
        "compile_status": compile_report["status"],
        "graphs_compiled": compile_report["data"].get("graphs_compiled"),
        "startup_decisions": (health.get("startup_decisions") or {}).get("decisions"),
        "optimization_seconds": {r["name"]: r["seconds"] for r in health["optimizations"] if r["seconds"] >= 0.05},
        "warmed": health.get("shapes", {}).get("warmed"),
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
