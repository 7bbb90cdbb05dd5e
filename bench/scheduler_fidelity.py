"""Solver fidelity: every candidate few-step solver against Euler@28 and diffusers' DPM-Solver++(2M) at the same
step count, on the closed-form suite (tests/flow_problems.py), at 8-20 steps and mu 0.5-1.15.

Run from the repo root:  PYTHONPATH=. .venv/bin/python bench/scheduler_fidelity.py
Writes bench/results/scheduler_fidelity.json (every error) and bench/results/scheduler_fidelity.md (the worst
ratios, which BENCHMARKS.md quotes). CPU only, float64, about a minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests package and flux_kontext, when run as a script

import numpy as np  # noqa: E402

from bench.scheduler_accuracy import run_stamp  # noqa: E402
from flux_kontext.schedulers import DEFAULT_SOLVER  # noqa: E402
from flux_kontext.schedulers.flow_unipc import LOW_NOISE_MU, tapered_shift_sigmas  # noqa: E402
from tests import flow_problems as fp  # noqa: E402

COMMAND = "PYTHONPATH=. .venv/bin/python bench/scheduler_fidelity.py"
EULER28, DPM = "euler@28", "diffusers DPM 2M"


def _pipeline_u(steps: int) -> np.ndarray:
    return np.linspace(1.0, 1 / steps, steps)


# What was tried (name -> error(steps, problem, mu)); the default is the service's DEFAULT_SOLVER.
CANDIDATES = {
    f"{DEFAULT_SOLVER} (default)": lambda n, p, mu: fp.service_error(DEFAULT_SOLVER, n, p, mu),
    "dpmpp_2m": lambda n, p, mu: fp.service_error("dpmpp_2m", n, p, mu),
    "dpmpp_2m_karras": lambda n, p, mu: fp.service_error("dpmpp_2m_karras", n, p, mu),
    "dpmpp_2m, schedule ending at u = 1/(2n)": lambda n, p, mu: fp.service_error(
        "dpmpp_2m", n, p, mu, u=np.linspace(1.0, 1 / (2 * n), n)
    ),
    "diffusers UniPC-2, FLUX sigmas": lambda n, p, mu: fp.diffusers_unipc_error(n, p, mu),
    "diffusers UniPC-3, FLUX sigmas": lambda n, p, mu: fp.diffusers_unipc_error(n, p, mu, order=3),
    f"UniPC-2, flat shift mu = {LOW_NOISE_MU}": lambda n, p, mu: fp.diffusers_unipc_error(
        n, p, 0.0, u=tapered_shift_sigmas(_pipeline_u(n), LOW_NOISE_MU, power=0.0)
    ),
    "euler": lambda n, p, mu: fp.service_error("euler", n, p, mu),
}


def measure() -> list[dict]:
    rows = []
    for problem in fp.suite():
        for mu in fp.MUS:
            euler28 = fp.euler_reference_error(problem, mu)
            for steps in fp.STEPS:
                errors = {EULER28: euler28, DPM: fp.diffusers_dpm_error(steps, problem, mu)}
                errors.update({name: error(steps, problem, mu) for name, error in CANDIDATES.items()})
                rows.append(dict(problem=problem.name, group=problem.group, mu=mu, steps=steps, errors=errors))
    return rows


def worst_ratios(rows: list[dict], group: str) -> dict[str, dict[int, tuple[float, float]]]:
    """Per candidate and step count: the largest error / Euler@28 and error / diffusers' DPM@same steps."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for row in (r for r in rows if r["group"] == group):
        for name in CANDIDATES:
            err = row["errors"][name]
            vs_euler, vs_dpm = out.setdefault(name, {}).get(row["steps"], (0.0, 0.0))
            ratios = (max(vs_euler, err / row["errors"][EULER28]), max(vs_dpm, err / row["errors"][DPM]))
            out[name][row["steps"]] = ratios
    return out


def markdown(rows: list[dict]) -> str:
    parts = []
    for group in ("2d", "high-dim"):
        head = ["solver", *(f"{n} steps" for n in fp.STEPS)]
        lines = [f"**{group}** (worst over problems and mu: error / Euler@28, error / diffusers DPM 2M@same steps)", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, by_steps in worst_ratios(rows, group).items():
            cells = [f"{by_steps[n][0]:.2f} / {by_steps[n][1]:.2f}" for n in fp.STEPS]
            lines.append("| " + " | ".join([name, *cells]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    rows = measure()
    table = markdown(rows)
    now, versions = run_stamp()
    results = ROOT / "bench" / "results"
    meta = dict(date=now, command=COMMAND, versions=versions, problems=[p.name for p in fp.suite()], mus=fp.MUS)
    (results / "scheduler_fidelity.json").write_text(json.dumps(dict(**meta, rows=rows), indent=1) + "\n")
    (results / "scheduler_fidelity.md").write_text(
        "# Solver fidelity on closed-form flows\n\n"
        "RMS error at sigma = 0 against the exact transport, each solver driven as FluxKontextPipeline drives it.\n"
        "A ratio below 1 means more accurate than the reference. Problems: tests/flow_problems.py.\n\n"
        f"{table}\n\nCommand: `{COMMAND}`\n\nDate: {now}; python {versions['python']}, torch {versions['torch']}, "
        f"diffusers {versions['diffusers']}; CPU.\n"
    )
    print(table)


if __name__ == "__main__":
    main()
