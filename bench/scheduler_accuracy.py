"""Scheduler accuracy table: RMS error to the exact flow solution, per scheduler, step count and problem.

Run from the repo root:  PYTHONPATH=. .venv/bin/python bench/scheduler_accuracy.py
Writes bench/results/scheduler_accuracy.json and bench/results/scheduler_accuracy.md. The problems and the solve loop
(the pipeline's own scheduler calls) are the ones tests/test_scheduler_accuracy.py asserts on, imported so the
table and the tests cannot drift apart. CPU only, float64, a few seconds.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests module and flux_kontext, when run as a script

import diffusers  # noqa: E402
import torch  # noqa: E402

from flux_kontext.schedulers import SCHEDULERS  # noqa: E402
from tests.test_scheduler_accuracy import MU, error, gaussian_problem, mixture_problem  # noqa: E402

STEPS = (7, 14, 28, 56)
ASYMPTOTIC = (256, 512)  # where the observed order is closest to its limit
COMMAND = "PYTHONPATH=. .venv/bin/python bench/scheduler_accuracy.py"
PROBLEMS = {
    "gaussian": gaussian_problem,  # 8-dim N(m, s^2), s in [0.3, 1.2]: exact answer m + s * x1
    "mixture": mixture_problem,  # 2-dim, 3 components, std 0.6-0.8: RK4 reference
    # Narrow components (std 0.3-0.5): the case where 14 DPM steps do NOT match 28 Euler steps at 1024px.
    "narrow mixture": lambda: mixture_problem((0.3, 0.5, 0.4), "narrow mixture"),
}


def measure() -> list[dict]:
    rows = []
    for problem_name, build in PROBLEMS.items():
        problem = build()
        for resolution, mu in MU.items():
            for name in SCHEDULERS:
                errors = {n: error(name, n, problem, mu) for n in STEPS + ASYMPTOTIC}
                orders = {f"{a}->{b}": math.log2(errors[a] / errors[b]) for a, b in itertools.pairwise(STEPS)}
                a, b = ASYMPTOTIC
                orders[f"{a}->{b}"] = math.log2(errors[a] / errors[b])
                rows.append(
                    dict(
                        problem=problem_name, resolution=resolution, mu=mu, scheduler=name, errors=errors, orders=orders
                    )
                )
    return rows


def markdown(rows: list[dict]) -> str:
    order_keys = list(rows[0]["orders"])
    head = ["problem", "mu", "scheduler", *(f"err@{n}" for n in STEPS), *(f"order {k}" for k in order_keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["problem"], f"{row['mu']:.2f} ({row['resolution']})", row["scheduler"]]
        cells += [f"{row['errors'][n]:.2e}" for n in STEPS] + [f"{row['orders'][k]:.2f}" for k in order_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_stamp() -> tuple[str, dict]:
    """The date (UTC) and the versions a CPU scheduler result records."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    return now, dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__)


def main() -> None:
    rows = measure()
    table = markdown(rows)
    now, versions = run_stamp()
    out = ROOT / "bench" / "results" / "scheduler_accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(date=now, command=COMMAND, versions=versions, rows=rows), indent=1) + "\n")
    (ROOT / "bench" / "results" / "scheduler_accuracy.md").write_text(
        "# Scheduler accuracy on closed-form flows\n\n"
        "RMS error at sigma = 0 against the exact solution (Gaussian: closed form; mixtures: float64 RK4, 800 steps),\n"
        "driving each scheduler exactly as FluxKontextPipeline does (sigmas = linspace(1, 1/n, n), FLUX's dynamic\n"
        "shift mu, model time t/1000). Order = log2(err(n) / err(2n)): 1 means error ~ h, 2 means error ~ h^2.\n\n"
        f"{table}\n\n"
        "Reading it (error ratio per doubling = 2^order): Euler is first order everywhere. DPM-Solver++ 2M's\n"
        "order climbs towards 2 but only as 2 - log2(log(2n)/log(n)) (1.83 at n = 256; measured 1.7-1.8): the\n"
        "pipeline's sigmas are uniform near 0, so the last few 2M steps are O(1) wide in log-SNR and the final\n"
        "step to sigma = 0 is first order, giving error ~ log(n)/n^2. The Karras ends (noise-to-signal ratio of\n"
        "the second and the last shifted sigma) spread like n and 1/n as n grows, so its order stays near 1.5-1.6.\n"
        "2M at 14 steps beats Euler at 28 on the unit-scale problems, but not on the narrow mixture at mu = 1.15,\n"
        "where the 14-step shifted schedule has one sigma (0.20) below 0.3, so its first-order last step dominates.\n\n"
        f"Command: `{COMMAND}`\n\n"
        f"Date: {now}; python {versions['python']}, torch {versions['torch']}, "
        f"diffusers {versions['diffusers']}; CPU.\n"
    )
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
