"""Static per-shape compile against compile for dynamic shapes, on the serving engine (no warm-up, fresh
Inductor/Triton caches): for each strategy, the first call at each shape (its compile) and its repeat, and the
steady-state ms/step at 1024² edit and text-to-image (every step computed: the first-block cache off), then the
first call at a new shape (672x1568 text-to-image, a 1392x752 edit).

    FLUX_MODEL=random python bench/compile_shapes.py --strategy static --out bench/results/compile-static.json

Each strategy in its own process (a fresh dynamo state and fresh caches); the results JSON is rewritten after each
call, so a run cut short keeps what it measured.
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

SHAPES = (  # (name, mode, width, height)
    ("edit 1024x1024", "edit", 1024, 1024),
    ("text_to_image 1024x1024", "text_to_image", 1024, 1024),
    ("text_to_image 672x1568", "text_to_image", 672, 1568),
    ("edit 1392x752", "edit", 1392, 752),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=("static", "dynamic"), required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    caches = tempfile.mkdtemp(prefix=f"compile-{args.strategy}-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{caches}/inductor"  # before torch is imported: fresh caches
    os.environ["TRITON_CACHE_DIR"] = f"{caches}/triton"

    from bench.resolution_sweep import versions
    from flux_kontext.engine import Engine
    from flux_kontext.settings import Settings
    from flux_kontext.warmup_shapes import Shape, graphs_compiled_by

    settings = Settings(warmup=False, compile_dynamic=args.strategy == "dynamic")
    engine = Engine(settings)
    engine.load()
    if not engine.ready:
        raise SystemExit(f"engine failed: {engine.reason}")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "strategy": args.strategy,
        "device": engine.describe_device(),
        "versions": versions(),
        "load_seconds": round(engine.load_seconds, 1),
        "calls": [],
    }
    for name, mode, width, height in SHAPES:
        shape = Shape(mode, width, height)
        for attempt in ("first", "repeat", "repeat"):
            job = shape.job(seed=1, steps=args.steps)
            job.cache_threshold = 0.0
            start = time.perf_counter()
            out = engine.generate(job)
            timings = out.timings_ms
            result["calls"].append(
                {
                    "shape": name,
                    "call": attempt,
                    "wall_s": round(time.perf_counter() - start, 2),
                    "graphs_compiled": graphs_compiled_by(out),
                    "ms_per_step": round(timings["denoising"] / out.steps, 2),
                    "image_encoding_ms": timings["image_encoding"],
                    "decoding_ms": timings["decoding"],
                    "engine_ms": timings["engine_total"],
                }
            )
            print(json.dumps(result["calls"][-1]), flush=True)
            if args.out is not None:
                args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
