"""Timed generations on the live engine, used by GET /benchmark and `flux_kontext_optimized.py benchmark`."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from flux_kontext.jobs import PHASES, Job, JobResult


@dataclass(frozen=True)
class BenchmarkParams:
    runs: int = 3
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    mode: Literal["edit", "text_to_image"] = "edit"
    warmup_runs: int = 1
    scheduler: str | None = None  # None: the server's default


def synthetic_input(width: int, height: int) -> Image.Image:
    """A deterministic, non-constant input image (a colour gradient) of the given size."""
    gradient = Image.linear_gradient("L").resize((width, height))
    return Image.merge("RGB", (gradient, gradient.transpose(Image.FLIP_LEFT_RIGHT), gradient.rotate(90)))


def benchmark_job(params: BenchmarkParams, seed: int) -> Job:
    return Job(
        prompt="benchmark: turn the sky into a sunset",
        seed=seed,
        image=synthetic_input(params.width, params.height) if params.mode == "edit" else None,
        width=params.width,
        height=params.height,
        steps=params.steps,
        scheduler=params.scheduler,
    )


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95_index = math.ceil(0.95 * len(ordered)) - 1  # nearest-rank percentile
    return {
        "median": round(statistics.median(ordered), 2),
        "p95": round(ordered[p95_index], 2),
        "min": round(ordered[0], 2),
        "max": round(ordered[-1], 2),
    }


async def run_benchmark(
    engine, params: BenchmarkParams, submit: Callable[[Job], Awaitable[tuple[JobResult, float]]]
) -> dict:
    """Warm up, then time ``params.runs`` generations submitted through ``submit`` (the service's queue)."""
    for i in range(params.warmup_runs):
        await submit(benchmark_job(params, seed=i))
    engine.reset_peak_memory()
    per_phase: dict[str, list[float]] = {phase: [] for phase in (*PHASES, "queue_wait", "engine_total")}
    wall_start = time.perf_counter()
    last: JobResult | None = None
    for i in range(params.runs):
        last, wait_ms = await submit(benchmark_job(params, seed=1000 + i))
        for phase in PHASES + ("engine_total",):
            per_phase[phase].append(last.timings_ms[phase])
        per_phase["queue_wait"].append(wait_ms)
    wall_s = time.perf_counter() - wall_start
    return {
        "params": {
            "runs": params.runs,
            "width": params.width,
            "height": params.height,
            "steps": last.steps,
            "mode": params.mode,
            "scheduler": last.scheduler,
            "warmup_runs": params.warmup_runs,
        },
        "timings_ms": {phase: summarize(values) for phase, values in per_phase.items()},
        "denoising_ms_per_step": round(statistics.median(per_phase["denoising"]) / last.steps, 2),
        "images_per_second": round(params.runs / wall_s, 4),
        "peak_gpu_memory_gib": engine.peak_memory_gib(),
        "device": engine.describe_device(),
        "versions": engine.versions(),
        "model": engine.describe_model(),
        "optimizations": last.optimizations,
        "first_block_cache": last.first_block_cache,  # of the last run: threshold, computed, skipped
        "cuda_graphs": last.cuda_graphs,  # of the last run: block calls replayed, captured, uncaptured
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_table(report: dict) -> str:
    """The report of ``run_benchmark`` as a table to read on a terminal (the JSON has everything)."""
    params, device = report["params"], report["device"]
    lines = [
        f"{params['mode']} {params['width']}x{params['height']}, {params['steps']} steps {params['scheduler']}, "
        f"{params['runs']} timed run(s) after {params['warmup_runs']} warm-up",
        f"device: {device.get('name')} ({device['type']}, {device['dtype']}); model: {report['model']['kind']}",
        "",
        f"{'phase (ms)':<16}{'median':>10}{'p95':>10}{'min':>10}{'max':>10}",
    ]
    for phase, stats in report["timings_ms"].items():
        lines.append(f"{phase:<16}" + "".join(f"{stats[key]:>10.1f}" for key in ("median", "p95", "min", "max")))
    peak = report["peak_gpu_memory_gib"]
    cache = report["first_block_cache"]
    lines += [
        "",
        f"denoising per step: {report['denoising_ms_per_step']:.1f} ms; images/s: {report['images_per_second']:.3f}; "
        f"peak GPU memory: {'n/a (CPU)' if peak is None else f'{peak:.2f} GiB'}",
        f"optimizations ran: {', '.join(report['optimizations']['ran']) or 'none'}",
    ]
    if cache:
        lines.append(f"first-block cache (last run): {cache['computed']} computed, {cache['skipped']} skipped")
    return "\n".join(lines)
