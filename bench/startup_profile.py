"""Where a restart's seconds go: the serving engine's start (load, optimize, warm-up) in this process under cProfile,
on a compile cache directory a previous start filled, as a restart would run it. Records each phase, each warm-up
generation, dynamo's compile-time metrics and the functions with the most time (cumulative and their own), and
writes the raw profile beside --out (``.prof``, for ``python -m pstats``). cProfile slows Python-heavy work (dynamo's
tracing) more than GPU or C++ work: read the shares, not the seconds. Under dynamo's frame hook cProfile also loses
the callers of the frames it compiles, so the cumulative list lacks the outer functions (engine.load among them):
dynamo's own metrics are the figures to trust. Run on the GPU, after a start filled the cache:

    FLUX_MODEL=random python bench/restart.py --cache-dir /tmp/flux-cache --starts 1 --out /tmp/cold.json
    FLUX_MODEL=random python bench/startup_profile.py --cache-dir /tmp/flux-cache --out /tmp/profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def top_functions(stats: pstats.Stats, key: str, count: int) -> list[dict]:
    """The ``count`` functions with the most ``key`` time ("cumulative" or "own")."""
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        rows.append({"function": f"{where}:{line}({name})", "calls": calls, "own_s": own, "cumulative_s": cumulative})
    rows.sort(key=lambda row: row["cumulative_s" if key == "cumulative" else "own_s"], reverse=True)
    rounded = ({**row, "own_s": round(row["own_s"], 3), "cumulative_s": round(row["cumulative_s"], 3)} for row in rows)
    return list(rounded)[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True, help="the kept FLUX_COMPILE_CACHE_DIR")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top", type=int, default=60)
    args = parser.parse_args()
    os.environ["FLUX_COMPILE_CACHE_DIR"] = str(args.cache_dir)  # before flux_kontext is imported (bytecode, caches)
    clock = time.perf_counter()
    import flux_kontext  # noqa: F401  (keeps bytecode where the interpreter would not)

    imports: dict = {}
    import torch  # noqa: F401  (timed alone)

    imports["torch"] = time.perf_counter() - clock
    clock = time.perf_counter()
    from bench.resolution_sweep import versions
    from bench.warmup_profile import compile_metrics
    from flux_kontext.engine import Engine
    from flux_kontext.logging_setup import configure_logging
    from flux_kontext.settings import Settings

    imports["service"] = time.perf_counter() - clock
    configure_logging()
    import torch._dynamo.utils as dynamo_utils

    engine = Engine(Settings())
    profiler = cProfile.Profile()
    clock = time.perf_counter()
    profiler.enable()
    engine.load()
    profiler.disable()
    load_s = time.perf_counter() - clock
    if not engine.ready:
        raise SystemExit(f"engine failed: {engine.reason}")
    profiler.dump_stats(args.out.with_suffix(".prof"))
    stats = pstats.Stats(profiler)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "versions": versions(),
        "device": engine.describe_device(),
        "note": "engine.load() under cProfile: Python-heavy work is slowed more than the rest; compare shares",
        "import_seconds": {k: round(v, 2) for k, v in imports.items()},
        "load_seconds_profiled": round(load_s, 2),
        "startup_seconds": {k: v and round(v, 2) for k, v in engine.startup_seconds.items()},
        "optimizations": {r.name: round(r.seconds, 2) for r in engine.reports},
        "shapes": engine.shapes_report(),
        "dynamo_compile_metrics": {
            name: {"calls": calls, "seconds": round(seconds, 2)}
            for name, (calls, seconds) in sorted(compile_metrics().items(), key=lambda item: -item[1][1])
        },
        "compile_times": dynamo_utils.compile_times(repr="str") if hasattr(dynamo_utils, "compile_times") else None,
        "by_cumulative": top_functions(stats, "cumulative", args.top),
        "by_own": top_functions(stats, "own", args.top),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("import_seconds", "load_seconds_profiled", "startup_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
