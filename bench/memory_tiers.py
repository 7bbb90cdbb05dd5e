"""Memory tiers: the serving engine started under simulated GPU capacities, each in a fresh process.

For each capacity (GiB; 0 = uncapped) the child caps its CUDA allocator with
``torch.cuda.set_per_process_memory_fraction`` and tells the memory plan the same budget (FLUX_GPU_MEMORY_GIB),
then starts the engine as the service does (FLUX_MODEL=random, the default stack, warm-up included) and records:
ready or not (and why), the plan (tier, placements, bytes), peak GPU memory, peak host RSS during load, time to
ready, a 1024² edit and a 1024² text-to-image end to end and per step (the second of two runs), and the largest
request the plan admits (a 1568x672 edit at its num_images limit, 2 steps). Capacity is simulated; the speed is
the lent GPU's. Run on the GPU:

    python bench/memory_tiers.py --caps 0,24,16,48,32 --cache-dir /tmp/flux-cache --out bench/results/memory-tiers.json
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
GIB = 2**30


def child(cap_gib: float, deadline: float) -> dict:
    """One capacity, in this process (called with --child)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from flux_kontext.engine import Engine
    from flux_kontext.jobs import Job
    from flux_kontext.logging_setup import configure_logging
    from flux_kontext.settings import Settings

    configure_logging()
    total = torch.cuda.get_device_properties(0).total_memory
    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total))
    row: dict = {"cap_gib": cap_gib or None, "gpu_total_gib": round(total / GIB, 1)}
    settings = Settings(model="random", gpu_memory_gib=cap_gib or None)
    engine = Engine(settings)
    start = time.perf_counter()
    engine.load()
    row.update(
        ready=engine.ready,
        reason=engine.reason,
        seconds_to_ready=round(time.perf_counter() - start, 1),
        startup_seconds=engine.startup_seconds,
        memory_plan=engine.describe_memory(),
        optimizations={r.name: r.status for r in engine.reports},
        peak_gpu_gib_load_and_warmup=round(torch.cuda.max_memory_reserved() / GIB, 2),
    )
    if not engine.ready:
        return row
    image = Image.new("RGB", (1024, 1024), (128, 64, 32))
    for mode, job_image in (("edit", image), ("text_to_image", None)):
        runs = []
        for _ in range(2):
            result = engine.generate(Job(prompt="a red fox in the snow", seed=1, image=job_image))
            runs.append(result.timings_ms)
        timed = runs[-1]
        row[mode] = {
            "steps": result.steps,
            "timings_ms_first": runs[0],
            "timings_ms": timed,
            "ms_per_step": round(timed["denoising"] / result.steps, 1),
        }
    row["peak_gpu_gib_1024"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    row["peak_gpu_allocated_gib_1024"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    plan = engine.model.plan
    from flux_kontext.memory_plan import LARGEST_REQUEST, Request

    most = plan.max_num_images(Request(*LARGEST_REQUEST, edit=True))
    if time.time() < deadline and most:
        wide = Image.new("RGB", LARGEST_REQUEST, (20, 90, 200))
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_reserved()
        try:
            result = engine.generate(Job(prompt="a red fox", seed=2, image=wide, steps=2, num_images=most))
            row["largest"] = {"num_images": most, "ok": True, "engine_total_ms": result.timings_ms["engine_total"]}
        except Exception as exc:  # the plan's margin was wrong: that is the finding
            row["largest"] = {"num_images": most, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        row["largest"]["reserved_before_gib"] = round(before / GIB, 2)
        row["largest"]["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        row["largest"]["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", default="0,24,16,48,32", help="GiB, comma-separated; 0 = uncapped")
    parser.add_argument("--cache-dir", type=Path, default=None, help="FLUX_COMPILE_CACHE_DIR shared by the children")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting children after this long")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.out.write_text(json.dumps(child(args.child, args.deadline), indent=1, default=str))
        return 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    if args.cache_dir:
        env["FLUX_COMPILE_CACHE_DIR"] = str(args.cache_dir)
    started = time.time()
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    for cap in (float(c) for c in args.caps.split(",")):
        left = args.budget_s - (time.time() - started)
        if left < 60:
            result["runs"].append({"cap_gib": cap or None, "skipped": f"out of time ({left:.0f} s left)"})
            continue
        part = args.out.with_suffix(f".cap{int(cap)}.json")
        command = [sys.executable, __file__, "--child", str(cap), "--out", str(part)]
        command += ["--deadline", str(time.time() + left - 30)]
        log_path = part.with_suffix(".log")  # the child's log, kept when it is stopped at the deadline
        try:
            with log_path.open("w") as log:
                done = subprocess.run(command, env=env, timeout=left, stdout=log, stderr=subprocess.STDOUT)
            row = json.loads(part.read_text()) if part.exists() else {"cap_gib": cap, "exit": done.returncode}
            if done.returncode:
                row["log_tail"] = log_path.read_text()[-1500:]
        except subprocess.TimeoutExpired:
            row = {"cap_gib": cap or None, "timeout_s": round(left), "log_tail": log_path.read_text()[-1500:]}
        result["runs"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps(_summary(row)), flush=True)
    try:
        import torch

        result["device"] = torch.cuda.get_device_name()
        result["torch"] = torch.__version__
        import diffusers

        result["diffusers"] = diffusers.__version__
    except Exception as exc:  # the summary still stands without the versions
        result["versions_error"] = str(exc)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


def _summary(row: dict) -> dict:
    plan = row.get("memory_plan") or {}
    return {
        "cap": row.get("cap_gib"),
        "ready": row.get("ready"),
        "reason": (row.get("reason") or "")[:200],
        "tier": plan.get("tier"),
        "t5": (plan.get("placements") or {}).get("text_encoder_2"),
        "max_images": plan.get("max_num_images_largest_edit"),
        "s_to_ready": row.get("seconds_to_ready"),
        "edit_ms": (row.get("edit") or {}).get("timings_ms", {}).get("engine_total"),
        "edit_step": (row.get("edit") or {}).get("ms_per_step"),
        "t2i_ms": (row.get("text_to_image") or {}).get("timings_ms", {}).get("engine_total"),
        "peak": row.get("peak_gpu_gib_1024"),
        "rss": ((plan.get("load") or {}).get("host_rss_peak_gib")),
        "largest": row.get("largest"),
        "exit": row.get("exit"),
    }


if __name__ == "__main__":
    sys.exit(main())
