"""Host-side levers of the transformer step, A/B in one engine (#18): the stage table's stage 5 built once, then
generations of each variant interleaved (A B A B ...), so that the machine's drift falls on every variant alike.

Variants (each a per-request setting or a switch of the running engine, no rebuild between them):
- ``decision_read``: the first-block cache at threshold 1e-6, which on random weights never skips but reads the
  residual's change back from the GPU every step (one synchronization per step: main before this session);
- ``no_sync``: threshold 0, decided without reading the GPU (first_block_cache.py), the stage table's setting.

Each variant's text-to-image and edit ms/step (denoising median / steps) and its cache counts; with ``--profile``,
bench/step_profile.py's per-step breakdown (idle gaps included) of one text-to-image generation per variant.

    FLUX_MODEL=random python bench/step_levers.py --rounds 3 --profile --out bench/results/step-levers-h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stages import STAGES  # noqa: E402
from bench.step_profile import profile_generation  # noqa: E402
from flux_kontext.benchmark import BenchmarkParams, benchmark_job  # noqa: E402
from flux_kontext.engine import Engine  # noqa: E402
from flux_kontext.logging_setup import configure_logging  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402

log = logging.getLogger("bench.step_levers")

VARIANTS = {"decision_read": {"cache_threshold": 1e-6}, "no_sync": {"cache_threshold": 0.0}}


def _job(mode: str, seed: int, fields: dict):
    job = benchmark_job(BenchmarkParams(width=1024, height=1024, mode=mode, scheduler="dpmpp_2m"), seed)
    return dataclasses.replace(job, **fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configure_logging()
    overrides = next(settings for stage, _, settings, _ in STAGES if stage == "5")
    engine = Engine(Settings(**overrides))
    engine.load()
    if not engine.ready:
        raise SystemExit(f"engine not ready: {engine.reason}")
    names = args.variants.split(",")
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": engine.describe_device(),
        "versions": engine.versions(),
        "settings": overrides,
        "variants": {name: VARIANTS[name] for name in names},
        "modes": {},
    }
    for mode in ("text_to_image", "edit"):
        for name in names:  # each variant's first request (a shape's CUDA graphs are captured on its second call)
            engine.generate(_job(mode, 0, VARIANTS[name]))
        samples = {name: [] for name in names}
        counts = {}
        for round_ in range(args.rounds):
            for name in names:
                result = engine.generate(_job(mode, 100 + round_, VARIANTS[name]))
                samples[name].append(result.timings_ms["denoising"] / result.steps)
                counts[name] = {"first_block_cache": result.first_block_cache, "cuda_graphs": result.cuda_graphs}
        report["modes"][mode] = {
            name: {
                "ms_per_step_median": round(statistics.median(values), 2),
                "ms_per_step": [round(v, 2) for v in values],
                **counts[name],
            }
            for name, values in samples.items()
        }
        log.info("%s: %s", mode, json.dumps(report["modes"][mode]))
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.profile:
        report["profiles"] = {
            name: profile_generation(engine, "text_to_image", "dpmpp_2m", fields=VARIANTS[name]) for name in names
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
