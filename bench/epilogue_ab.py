"""The single blocks' proj_out with the gated residual in the GEMM's epilogue, off and on, in one process (#18):
bench/stages.py's stage 5 built twice, once with the start-up check made to refuse the fused GEMM
(``gemm_residual.MAX_SLOWDOWN = 0``: cuBLAS's GEMM then the residual kernel) and once made to take it wherever its
error check passes (``MAX_SLOWDOWN = inf``), each timed as the stage table times a stage, with bench/step_profile.py's
breakdown of a text-to-image step. What the service itself decides is the check's own answer at its threshold
(bench/gemm_epilogue.py's ``start_up_decision``).

    FLUX_MODEL=random python bench/epilogue_ab.py --out bench/results/epilogue-ab-h200.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stages import STAGES, measure_stage  # noqa: E402
from flux_kontext.logging_setup import configure_logging  # noqa: E402
from flux_kontext.optimizations.kernels import gemm_residual  # noqa: E402

log = logging.getLogger("bench.epilogue_ab")

VARIANTS = {"cublas_then_residual": 0.0, "residual_in_epilogue": math.inf}  # MAX_SLOWDOWN for each


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    configure_logging()
    _, what, overrides, scheduler = next(row for row in STAGES if row[0] == "5")
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": {}}
    for name, slowdown in VARIANTS.items():
        gemm_residual.MAX_SLOWDOWN = slowdown
        try:
            row = measure_stage(name, what, overrides, scheduler, args.runs, None, profile=True)
        except Exception as exc:  # keep the other variant's numbers
            log.exception("variant %s failed", name)
            row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        report["variants"][name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
