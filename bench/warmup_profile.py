"""Where a cold start's time goes, and what compile for dynamic shapes costs per step: one process, the serving
engine in-process (no HTTP, no warm-up), fresh Inductor/Triton caches.

1. Start: seconds from process start to the imports done, CUDA initialized, each engine phase, and each
   optimization's own apply seconds (the FP8 screen and kernel timing sit in ``optimize``).
2. Compile for dynamic shapes (the default): the first 1024² edit and text-to-image (2 steps; what each phase took,
   the graphs compiled, dynamo's and Inductor's compile-time metrics for the call), their repeat (CUDA graph capture),
   the steady state at ``--steps`` per solver, then each per-request switch off (its compiled variant).
3. The blocks recompiled with static shapes (``FLUX_COMPILE_DYNAMIC=false``'s code; the VAE keeps its compiled code):
   their first calls and the steady state, in the same process on the same weights.

    FLUX_MODEL=random TORCH_LOGS=recompiles python bench/warmup_profile.py --out bench/results/warmup-profile.json

The JSON is rewritten after every call, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("text_encoding", "image_encoding", "denoising", "decoding", "engine_total")


class Profile:
    def __init__(self, out: Path | None):
        self.out = out
        self.data: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}
        self.data["calls"] = []

    def save(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.data, indent=1) + "\n")


def compile_metrics() -> dict[str, tuple[int, float]]:
    """dynamo's per-function compile-time record (name -> (calls, seconds)); empty where this torch lacks it."""
    import torch._dynamo.utils as dynamo_utils

    metrics = getattr(dynamo_utils, "compilation_time_metrics", {})
    return {name: (len(times), sum(times)) for name, times in metrics.items()}


def metrics_delta(before: dict, after: dict) -> dict[str, float]:
    delta = {}
    for name, (calls, seconds) in after.items():
        calls0, seconds0 = before.get(name, (0, 0.0))
        if calls > calls0:
            delta[name] = round(seconds - seconds0, 2)
    return dict(sorted(delta.items(), key=lambda item: -item[1]))


def run_call(engine, profile: Profile, label: str, job, phase: str) -> dict:
    from flux_kontext.warmup_shapes import graphs_compiled_by

    before = compile_metrics()
    start = time.perf_counter()
    out = engine.generate(job)
    wall = time.perf_counter() - start
    row = {
        "phase": phase,
        "call": label,
        "steps": out.steps,
        "scheduler": out.scheduler,
        "wall_s": round(wall, 3),
        **{f"{name}_ms": out.timings_ms.get(name) for name in PHASES},
        "ms_per_step": round(out.timings_ms["denoising"] / out.steps, 2),
        "graphs_compiled": graphs_compiled_by(out),
        "cuda_graphs": out.cuda_graphs,
        "compile_seconds": metrics_delta(before, compile_metrics()),
    }
    profile.data["calls"].append(row)
    profile.save()
    print(json.dumps({k: row[k] for k in ("phase", "call", "wall_s", "ms_per_step", "graphs_compiled")}), flush=True)
    return row


def job_for(mode: str, steps: int, **fields):
    from flux_kontext.warmup_shapes import Shape

    job = Shape(mode, 1024, 1024).job(seed=1, steps=steps)
    job.cache_threshold = 0.0  # every step computes (random weights say nothing about the skip rate)
    for name, value in fields.items():
        setattr(job, name, value)
    return job


def first_calls(engine, profile: Profile, phase: str) -> None:
    for mode in ("edit", "text_to_image"):
        for label in ("first", "repeat (captures graphs)"):
            run_call(engine, profile, f"{mode} {label}", job_for(mode, 2), phase)


def steady(engine, profile: Profile, phase: str, solvers: list[str], steps: int, runs: int) -> None:
    for solver in solvers:
        for mode in ("edit", "text_to_image"):
            for index in range(runs + 1):  # the first of each is a warm-up (a new step count: graphs, solver)
                label = f"{mode} {solver} {'warm-up' if index == 0 else f'run {index}'}"
                run_call(engine, profile, label, job_for(mode, steps, scheduler=solver), phase)


def recompile_blocks_static(engine) -> int:
    """The transformer blocks' compiled slot refilled with static-shape compile (the VAE keeps its code)."""
    from flux_kontext.optimizations.compile import CompiledForward

    compile_opt, slots = engine.stack["compile"], engine.stack.slots
    transformer = engine.model.pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    options = compile_opt.inductor_options()
    for block in blocks:
        slots.set(block, "compiled", lambda inner: CompiledForward(inner, options, print, dynamic=False))
    return len(blocks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=14, help="steady-state steps per request")
    parser.add_argument("--runs", type=int, default=2, help="timed steady-state runs per mode and solver")
    parser.add_argument("--solvers", default="unipc,dpmpp_2m")
    parser.add_argument("--save-artifacts", type=Path, help="write torch.compiler.save_cache_artifacts() here")
    parser.add_argument("--no-static", action="store_true", help="skip the static-shape comparison")
    args = parser.parse_args()
    caches = tempfile.mkdtemp(prefix="warmup-profile-")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"{caches}/inductor")  # before torch is imported: fresh caches
    os.environ.setdefault("TRITON_CACHE_DIR", f"{caches}/triton")
    profile = Profile(args.out)
    from flux_kontext.device import seconds_since_process_start

    start: dict = {"interpreter": seconds_since_process_start()}
    clock = time.perf_counter()
    import torch

    start["import_torch"] = time.perf_counter() - clock
    clock = time.perf_counter()
    from bench.resolution_sweep import versions
    from flux_kontext.engine import Engine
    from flux_kontext.logging_setup import configure_logging
    from flux_kontext.settings import Settings

    start["import_service"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")
    start["cuda_init"] = time.perf_counter() - clock
    configure_logging()
    engine = Engine(Settings(warmup=False))
    engine.load()
    if not engine.ready:
        raise SystemExit(f"engine failed: {engine.reason}")
    start["engine"] = {k: v and round(v, 2) for k, v in engine.startup_seconds.items()}
    start["optimizations"] = {r.name: round(r.seconds, 2) for r in engine.reports}
    profile.data.update(start=start, device=engine.describe_device(), versions=versions())
    profile.data["flag_variants"] = engine.stack.warmup_flag_variants()[1:]
    profile.save()
    solvers = args.solvers.split(",")

    first_calls(engine, profile, "dynamic")
    steady(engine, profile, "dynamic", solvers, args.steps, args.runs)
    for flags in profile.data["flag_variants"]:
        for label in ("first", "repeat"):
            job = job_for("text_to_image", 2, flags=flags)
            run_call(engine, profile, f"text_to_image {flags} {label}", job, "dynamic")
    if not args.no_static and engine.stack["compile"].applied:
        profile.data["static_blocks"] = recompile_blocks_static(engine)
        first_calls(engine, profile, "static")
        steady(engine, profile, "static", solvers, args.steps, args.runs)
    if args.save_artifacts is not None:  # torch's portable compile cache: how big, how long to write
        clock = time.perf_counter()
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            args.save_artifacts.write_bytes(saved[0])
        profile.data["cache_artifacts"] = {
            "seconds": round(time.perf_counter() - clock, 2),
            "bytes": len(saved[0]) if saved else 0,
            "artifacts": {k: len(v) for k, v in getattr(saved[1], "artifacts", {}).items()} if saved else None,
        }
    profile.data["compile_report"] = next(r.public() for r in engine.reports if r.name == "compile")
    profile.data["peak_gpu_memory_gib"] = engine.peak_memory_gib()
    profile.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
