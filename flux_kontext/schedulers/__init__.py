"""The schedulers' one home: names, default step counts, the classes (flow_unipc.py: UniPC-2 on a tapered-shift
schedule, the default few-step solver; flow_dpm.py: DPM-Solver++ 2M for FLUX's rectified flow), and
``make_scheduler``. This module imports no torch, so the HTTP layer can validate names.

A fresh scheduler per request (schedulers are stateful), built from the loaded pipeline's scheduler config.
euler is the model's own FlowMatchEulerDiscreteScheduler. Accuracy on closed-form flows:
tests/test_scheduler_accuracy.py, tests/test_scheduler_fidelity.py and bench/scheduler_accuracy.py; numbers and the
choice of the default in BENCHMARKS.md ("Solver fidelity").
"""

from __future__ import annotations

# Scheduler names and their default step counts.
SCHEDULER_DEFAULT_STEPS = {"euler": 28, "dpmpp_2m": 14, "dpmpp_2m_karras": 14, "unipc": 14}
SCHEDULERS = tuple(SCHEDULER_DEFAULT_STEPS)
DEFAULT_SOLVER = "unipc"  # the default few-step solver: what the seed's use_dpm_solver: true selects
DEFAULT_DPM = DEFAULT_SOLVER  # the older name of the same constant
EULER = "euler"


def scheduler_class(name: str):
    if name not in SCHEDULER_DEFAULT_STEPS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    if name == EULER:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler
    from flux_kontext.schedulers.flow_dpm import FlowDPMSolverKarrasScheduler, FlowDPMSolverMultistepScheduler
    from flux_kontext.schedulers.flow_unipc import FlowUniPCScheduler

    return {
        "dpmpp_2m": FlowDPMSolverMultistepScheduler,
        "dpmpp_2m_karras": FlowDPMSolverKarrasScheduler,
        "unipc": FlowUniPCScheduler,
    }[name]


def make_scheduler(name: str, model_config: dict):
    """A new scheduler for one request; ``model_config`` is the loaded pipeline's scheduler config."""
    return scheduler_class(name).from_config(dict(model_config))
