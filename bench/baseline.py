"""Naive baseline on the live engine: per-phase times for a 1024² edit and a 1024² text-to-image.

Why: every speedup in BENCHMARKS.md ("Naive baseline (stage 0)") is against this. Eager bf16, attention through
PyTorch SDPA and the model's Euler scheduler (the stack holds only ``attention`` on sdpa and ``dpm_solver``, asked for
euler: nothing else is applied, whatever the defaults are), 28 steps, whatever model FLUX_MODEL names (`random` on
machines without the weights: same architecture and FLOPs, so the same speed). Writes one JSON under bench/results/.

    FLUX_MODEL=random python bench/baseline.py --runs 3 --out bench/results/baseline-h100.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_json  # noqa: E402
from flux_kontext.benchmark import BenchmarkParams, run_benchmark  # noqa: E402
from flux_kontext.engine import Engine  # noqa: E402
from flux_kontext.logging_setup import configure_logging  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402
from flux_kontext.stack import stack_for  # noqa: E402

log = logging.getLogger("bench.baseline")
NAIVE_STACK = ("attention", "dpm_solver")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configure_logging()

    settings = Settings(attention="sdpa", fp8_attention="off")
    engine = Engine(settings, stack=stack_for(settings, only=NAIVE_STACK))
    engine.load()
    if not engine.ready:
        log.error("engine failed: %s", engine.reason)
        return 1

    async def submit(job):
        return engine.generate(job), 0.0

    results = {
        "load_seconds": round(engine.load_seconds, 2),
        "optimizations": [report.public() for report in engine.reports],  # what the stack did: attention, dpm_solver
        "runs": {},
    }
    for mode in ("edit", "text_to_image"):
        params = BenchmarkParams(
            runs=args.runs, width=args.size, height=args.size, steps=args.steps, mode=mode, scheduler="euler"
        )
        results["runs"][mode] = asyncio.run(run_benchmark(engine, params, submit))
        t = results["runs"][mode]["timings_ms"]
        log.info(
            "%s: per step %.1f ms; text %.1f, image enc %.1f, denoise %.1f, decode %.1f, total %.1f ms",
            mode,
            results["runs"][mode]["denoising_ms_per_step"],
            *(t[p]["median"] for p in ("text_encoding", "image_encoding", "denoising", "decoding", "engine_total")),
        )
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
