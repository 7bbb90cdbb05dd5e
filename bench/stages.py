"""The seed's stage table, measured: each stage is a fresh engine with the stack up to that stage.

For each stage and for a 1024² edit (1024² input) and a 1024² text-to-image: transformer ms/step, VAE ms,
text-encoder ms, end-to-end ms, speedups, peak GPU memory, first-call (compile) seconds, and the ratio of
the transformer step to the FLOP floor (docs/FACTS.md: 60 / 152 ms per step with FP8 GEMMs at 1600 TFLOP/s and
bf16 attention at 650; 52 / 125 where FA3 runs in FP8). Run on a GPU:

    FLUX_MODEL=random python bench/stages.py --runs 2 --out bench/results/stages-h100.json

One JSON is written after every stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flux_kontext.benchmark import BenchmarkParams, run_benchmark  # noqa: E402
from flux_kontext.engine import Engine  # noqa: E402
from flux_kontext.logging_setup import configure_logging  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402

log = logging.getLogger("bench.stages")

FLOOR_MS_PER_STEP = {"text_to_image": 60.0, "edit": 152.0}
FLOOR_MS_PER_STEP_FP8_ATTENTION = {"text_to_image": 52.0, "edit": 125.0}  # attention at FA3 FP8's rate too
NAIVE = dict(
    attention="sdpa",
    fuse_qkv=False,
    quantize="none",
    compile=False,
    first_block_cache=False,
    cuda_graphs=False,
    text_encoder_graphs=False,
    fp8_attention="off",
)
# The cache is loaded from stage 1 on but held at threshold 0 (never skips) so the rows time the stack, not
# the random weights' skip rate; stage "5+cache" runs the seed's threshold and reports the skips it measured.
CACHE_OFF = dict(first_block_cache=True, cache_threshold=0.0)
FULL = dict(
    fuse_qkv=True, compile=True, attention="auto", quantize="auto", cuda_graphs=False, text_encoder_graphs=False
)
GRAPHS = dict(cuda_graphs=True, text_encoder_graphs=True)  # stage 5's addition, kept by the rows derived from it
# (stage, what it adds, settings, scheduler)
STAGES = (
    ("0", "naive bf16 diffusers (eager, SDPA)", NAIVE, "euler"),
    (
        "1",
        "+ compile (transformer blocks, VAE), fused QKV, first-block cache (threshold 0)",
        {**NAIVE, **CACHE_OFF, "fuse_qkv": True, "compile": True},
        "euler",
    ),
    (
        "2",
        "+ attention kernel by measurement (FA3 / cuDNN, bf16)",
        {**FULL, **CACHE_OFF, "quantize": "none", "fp8_attention": "off"},
        "euler",
    ),
    (
        "3",
        "+ FP8: rowwise GEMMs (MXFP4 on sm_100+) fed by our fused kernels, FA3 in FP8 where the screen allows",
        {**FULL, **CACHE_OFF},
        "euler",
    ),
    ("4", "+ DPM-Solver++ 2M, 14 steps", {**FULL, **CACHE_OFF}, "dpmpp_2m"),
    (
        "5",
        "+ CUDA graphs (per block and shape; CLIP and T5 one each)",
        {**FULL, **CACHE_OFF, **GRAPHS},
        "dpmpp_2m",
    ),
    (
        "5-bf16-attention",
        "stage 5 with FLUX_FP8_ATTENTION=off (bf16 attention)",
        {**FULL, **CACHE_OFF, **GRAPHS, "fp8_attention": "off"},
        "dpmpp_2m",
    ),
    (
        "5+cache",
        "stage 5 with the cache at the seed's 0.12 (skip rate on random weights means nothing)",
        {**FULL, **GRAPHS, "first_block_cache": True, "cache_threshold": 0.12},
        "dpmpp_2m",
    ),
)


def measure_stage(stage, what, overrides, scheduler, runs: int, only_steps: int | None, profile: bool = False) -> dict:
    engine = Engine(Settings(**overrides))
    engine.load()
    if not engine.ready:
        return {"stage": stage, "what": what, "error": engine.reason}

    async def submit(job):
        return engine.generate(job), 0.0

    row = {
        "stage": stage,
        "what": what,
        "settings": overrides,
        "scheduler": scheduler,
        "load_seconds": round(engine.load_seconds, 2),
        "first_call_seconds": round(engine.warmup_seconds or 0.0, 2),
        "optimizations": [r.public() for r in engine.reports],
        "modes": {},
    }
    fp8_attention = any(r.name == "attention" and r.detail.startswith("fa3_fp8") for r in engine.reports)
    floors = FLOOR_MS_PER_STEP_FP8_ATTENTION if fp8_attention else FLOOR_MS_PER_STEP
    row["fp8_attention"] = fp8_attention
    for mode in ("edit", "text_to_image"):
        params = BenchmarkParams(runs=runs, width=1024, height=1024, mode=mode, scheduler=scheduler, steps=only_steps)
        result = asyncio.run(run_benchmark(engine, params, submit))
        t = result["timings_ms"]
        per_step = result["denoising_ms_per_step"]
        row["modes"][mode] = {
            "steps": result["params"]["steps"],
            "transformer_ms_per_step": per_step,
            "denoising_ms": t["denoising"]["median"],
            "vae_ms": round(t["image_encoding"]["median"] + t["decoding"]["median"], 2),
            "vae_encode_ms": t["image_encoding"]["median"],
            "vae_decode_ms": t["decoding"]["median"],
            "text_encoder_ms": t["text_encoding"]["median"],
            "end_to_end_ms": t["engine_total"]["median"],
            "end_to_end_p95_ms": t["engine_total"]["p95"],
            "peak_gpu_memory_gib": result["peak_gpu_memory_gib"],
            "floor_ratio": round(per_step / floors[mode], 2),
            "floor_ms_per_step": floors[mode],
            "first_block_cache": result["first_block_cache"],
            "cuda_graphs": result["cuda_graphs"],
            "raw": result,
        }
        log.info("stage %s %s: %.1f ms/step, end-to-end %.0f ms", stage, mode, per_step, t["engine_total"]["median"])
    if profile:  # where a step's time goes, and the denoising loop's synchronizations (bench/step_profile.py)
        from bench.step_profile import profile_engine

        row["profile"] = profile_engine(engine, scheduler)
        log.info("stage %s profile: %s", stage, json.dumps(row["profile"])[:4000])
    engine.model = None  # drop the pipeline (tens of GB) before the next stage builds its own
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return row


def add_speedups(rows: list[dict]) -> None:
    """Speedups against stage 0 and the stage before; the variants of stage 5 ("5+cache", "5-bf16-attention")
    compare with stage 5."""
    for mode in ("edit", "text_to_image"):
        valid = [r for r in rows if mode in r.get("modes", {})]
        main = [r for r in valid if r["stage"].isdigit()]
        stage5 = next((r for r in valid if r["stage"] == "5"), None)
        previous_of = {id(r): p for p, r in zip([None, *main[:-1]], main, strict=True)}
        for row in valid:
            previous = previous_of.get(id(row), stage5)
            base = valid[0]["modes"][mode]["end_to_end_ms"]
            here = row["modes"][mode]
            here["speedup_vs_stage0"] = round(base / here["end_to_end_ms"], 2)
            if previous is not None:
                here["speedup_vs_previous"] = round(previous["modes"][mode]["end_to_end_ms"] / here["end_to_end_ms"], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--stages", default=",".join(stage for stage, *_ in STAGES))
    parser.add_argument("--steps", type=int, help="override every stage's steps (smoke runs only)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", help="stages to profile after timing them (bench/step_profile.py), e.g. 5")
    args = parser.parse_args()
    configure_logging()
    wanted = set(args.stages.split(","))
    rows, started = [], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for stage, what, overrides, scheduler in STAGES:
        if stage not in wanted:
            continue
        try:
            profile = stage in (args.profile or "").split(",")
            rows.append(measure_stage(stage, what, overrides, scheduler, args.runs, args.steps, profile))
        except Exception as exc:  # keep the stages already measured
            log.exception("stage %s failed", stage)
            rows.append({"stage": stage, "what": what, "error": f"{type(exc).__name__}: {exc}"})
        add_speedups(rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"started": started, "stages": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
