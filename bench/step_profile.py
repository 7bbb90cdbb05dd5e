"""Where a denoising step's time goes on a live engine, and whether the denoising loop synchronizes with the GPU.

``profile_generation`` runs one generation under torch.profiler (CPU and CUDA), with a record_function range around
each transformer forward (hooks on the transformer), and reads the exported trace: each GPU kernel is given to the
step whose transformer forward launched it (by the launch's correlation id; kernels inside CUDA graphs belong to the
graph launch). A step's GPU window runs from its first kernel to the next step's first kernel (so the scheduler step
and the host gaps between steps are in it); per step (median over steps): the window, the GPU time by kernel family
(GEMM, attention, each of our Triton kernels, Inductor's glue, other), the idle time inside the window (host gaps),
the host time per step, the costliest kernels, and where the idle time lies (``idle_gaps``: its ms per step by the
families of the kernels on either side of each gap, #18).

``sync_points`` runs one generation with ``torch.cuda.set_sync_debug_mode("warn")`` and lists every synchronizing
call made while a transformer forward or the step between two forwards runs (the denoising loop), by the innermost
frame of this project or diffusers that made it.

Used by bench/stages.py (``--profile``); GPU only.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

from flux_kontext.benchmark import BenchmarkParams, benchmark_job

STEP_RANGE = "flux_transformer_forward"
# First match wins: residual_ln_mod_fp8_kernel before ln_mod_fp8_kernel.
OUR_KERNELS = (
    "gelu_fp8_kernel",
    "residual_ln_mod_fp8_kernel",
    "ln_mod_fp8_kernel",
    "rows_fp8_kernel",
    "qk_norm_rope_kernel",
    "v_fp8_kernel",
    "fp8_gemm_gated_residual_kernel",
)


def family(name: str) -> str:
    """A GPU kernel's family, by its name."""
    lowered = name.lower()
    for kernel in OUR_KERNELS:
        if kernel in lowered:
            return kernel.removesuffix("_kernel")
    if lowered.startswith("triton_") or lowered.startswith("triton"):
        kind = lowered.split("_")[1] if "_" in lowered else "other"
        return f"inductor_{kind}"  # poi (pointwise), red / per (reductions), tem (templates)
    if any(k in lowered for k in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(k in lowered for k in ("gemm", "cutlass", "nvjet", "xmma", "scaled_mm", "f8f8", "sm90")):
        return "gemm"
    if "memcpy" in lowered or "memset" in lowered:
        return "memcpy_memset"
    if "elementwise" in lowered or "reduce" in lowered or "cat" in lowered:
        return "aten_eager"
    return "other"


class _StepHooks:
    """record_function ranges (and host timestamps) around each transformer forward."""

    def __init__(self, transformer):
        self.ranges, self.host_starts = [], []
        self._handles = [
            transformer.register_forward_pre_hook(self._enter),
            transformer.register_forward_hook(self._exit),
        ]

    def _enter(self, *_):
        self.host_starts.append(time.perf_counter())
        scope = torch.profiler.record_function(STEP_RANGE)
        scope.__enter__()
        self.ranges.append(scope)

    def _exit(self, *_):
        self.ranges.pop().__exit__(None, None, None)

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1000.0


def _gaps(window: list, window_end: float, min_us: float = 3.0) -> list[tuple[float, str, str]]:
    """The idle stretches of one step's GPU timeline (kernels sorted by start, up to the next step's first kernel
    at ``window_end``): (µs, family of the kernel before, family of the one after), for gaps of at least ``min_us``."""
    gaps, end, before = [], None, None
    for start, stop, name, _ in [*window, (window_end, window_end, "next step", None)]:
        if end is not None and start - end >= min_us:
            gaps.append((start - end, before, family(name) if name != "next step" else name))
        if end is None or stop > end:
            end, before = stop, family(name)
    return gaps


def _gap_summary(per_step_gaps: list[list]) -> dict:
    """Where the idle time of a step lies, median over steps: ms by (before -> after) kernel families (the 12
    largest), how many gaps, and the largest."""
    pairs = {f"{before} -> {after}" for gaps in per_step_gaps for _, before, after in gaps}
    by_pair = defaultdict(list)
    for gaps in per_step_gaps:
        totals = defaultdict(float)
        for us, before, after in gaps:
            totals[f"{before} -> {after}"] += us / 1000.0
        for pair in pairs:
            by_pair[pair].append(totals.get(pair, 0.0))
    ranked = sorted(((pair, statistics.median(v)) for pair, v in by_pair.items()), key=lambda kv: -kv[1])[:12]
    return {
        "ms_by_neighbours": {pair: round(ms, 3) for pair, ms in ranked},
        "gaps_per_step": statistics.median(len(g) for g in per_step_gaps),
        "largest_us": round(max((us for g in per_step_gaps for us, _, _ in g), default=0.0), 1),
    }


def analyse_trace(trace: dict) -> dict:
    """Per-step figures from a chrome trace written by torch.profiler (see the module's docstring)."""
    events = trace.get("traceEvents", [])
    # The host's ranges only: the trace repeats each record_function range on the GPU's timeline (gpu_user_annotation).
    steps = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("name") == STEP_RANGE and e.get("ph") == "X" and e.get("cat") == "user_annotation"
    )
    launches = {}
    for e in events:
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e["ts"]
    kernels = []
    for e in events:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        launched = launches.get(e.get("args", {}).get("correlation"))
        step = next((i for i, (a, b) in enumerate(steps) if launched is not None and a <= launched <= b), None)
        kernels.append((e["ts"], e["ts"] + e.get("dur", 0), e["name"], step))
    if len(steps) < 2 or not kernels:
        return {"error": f"{len(steps)} transformer forwards and {len(kernels)} kernels in the trace"}
    kernels.sort()
    firsts = [min((k[0] for k in kernels if k[3] == i), default=None) for i in range(len(steps))]
    per_step, top, step_gaps = [], defaultdict(lambda: [0.0, 0]), []
    for i in range(len(steps) - 1):  # the last step has no next one to close its window
        if firsts[i] is None or firsts[i + 1] is None:
            continue
        window = [k for k in kernels if firsts[i] <= k[0] < firsts[i + 1]]
        by_family = defaultdict(float)
        for start, stop, name, _ in window:
            by_family[family(name)] += (stop - start) / 1000.0
            top[name][0] += (stop - start) / 1000.0
            top[name][1] += 1
        window_ms = (firsts[i + 1] - firsts[i]) / 1000.0
        busy = _union_ms([(k[0], k[1]) for k in window])
        step_gaps.append(_gaps(window, firsts[i + 1]))
        per_step.append({"window_ms": window_ms, "busy_ms": busy, "idle_ms": window_ms - busy, **by_family})
    count = len(per_step)
    keys = sorted({key for row in per_step for key in row})
    median = {key: round(statistics.median(row.get(key, 0.0) for row in per_step), 3) for key in keys}
    host_ms = [(b - a) / 1000.0 for a, b in zip([s[0] for s in steps], [s[0] for s in steps[1:]], strict=False)]
    forward_host_ms = [(b - a) / 1000.0 for a, b in steps]
    ranked = sorted(top.items(), key=lambda kv: -kv[1][0])[:40]
    return {
        "steps_analysed": count,
        "per_step_median_ms": median,
        "host_ms_per_step_median": round(statistics.median(host_ms), 3),
        "host_ms_in_transformer_forward_median": round(statistics.median(forward_host_ms), 3),
        "idle_gaps": _gap_summary(step_gaps),
        "top_kernels_per_step": [
            {"ms": round(ms / count, 4), "calls": round(n / count, 2), "family": family(name), "name": name[:140]}
            for name, (ms, n) in ranked
        ],
    }


def _generate(engine, mode: str, seed: int, scheduler: str | None = None, fields: dict | None = None) -> None:
    params = BenchmarkParams(runs=1, warmup_runs=0, width=1024, height=1024, mode=mode, scheduler=scheduler)
    engine.generate(dataclasses.replace(benchmark_job(params, seed=seed), **(fields or {})))


def profile_generation(
    engine, mode: str, scheduler: str | None = None, trace_dir: Path | None = None, fields: dict | None = None
) -> dict:
    """One generation of ``mode`` at 1024² under the profiler (``fields``: the job's, e.g. cache_threshold); the
    per-step analysis (and the trace, gzip-free JSON, written into ``trace_dir`` when given)."""
    from torch.profiler import ProfilerActivity, profile

    hooks = _StepHooks(engine.model.pipe.transformer)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _generate(engine, mode, seed=7, scheduler=scheduler, fields=fields)
            torch.cuda.synchronize()
    finally:
        hooks.remove()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(trace_dir or tmp) / f"trace-{mode}.json"
        prof.export_chrome_trace(str(path))
        result = analyse_trace(json.loads(path.read_text()))
    return result


def sync_points(engine, mode: str, scheduler: str | None = None) -> dict:
    """Synchronizing calls inside the denoising loop of one generation (see the module's docstring)."""
    transformer = engine.model.pipe.transformer
    state = {"forwards": 0, "in_loop": False}
    found: Counter = Counter()
    outside: Counter = Counter()

    def enter(*_):
        state["forwards"] += 1
        state["in_loop"] = True

    handles = [transformer.register_forward_pre_hook(enter)]
    decode = engine.model.pipe.vae.decode

    def leave_loop(*args, **kwargs):
        state["in_loop"] = False
        return decode(*args, **kwargs)

    engine.model.pipe.vae.decode = leave_loop

    def record(message, category, filename, lineno, file=None, line=None):
        ours = ("flux_kontext", "diffusers")
        frames = [f for f in traceback.extract_stack()[:-1] if any(name in f.filename for name in ours)]
        where = filename
        if frames:
            where = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno} {frames[-1].line}"
        (found if state["in_loop"] else outside)[where[:200]] += 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _generate(engine, mode, seed=11, scheduler=scheduler)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        for handle in handles:
            handle.remove()
        engine.model.pipe.vae.decode = decode
    return {
        "transformer_forwards": state["forwards"],
        "in_denoising_loop": dict(found.most_common(20)),
        "outside_loop": dict(outside.most_common(20)),
    }


def profile_engine(engine, scheduler: str | None = None) -> dict:
    """The text-to-image profile with ``scheduler`` (None: the service's default), and the synchronizations of a
    text-to-image with it and with the default solver; a failure is recorded, never
    raised (the stage's timings stand)."""
    runs = {
        "profile_text_to_image": lambda: profile_generation(engine, "text_to_image", scheduler),
        "sync_text_to_image": lambda: sync_points(engine, "text_to_image", scheduler),
        "sync_text_to_image_default_solver": lambda: sync_points(engine, "text_to_image"),
    }
    result = {"scheduler": scheduler}
    for label, run in runs.items():
        try:
            result[label] = run()
        except Exception as exc:  # a bench keeps what it measured
            result[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return result


if __name__ == "__main__":  # re-analyse a saved trace: python bench/step_profile.py trace.json
    import sys

    print(json.dumps(analyse_trace(json.loads(Path(sys.argv[1]).read_text())), indent=2))
