"""Schedulers: a fresh instance per request (schedulers are stateful), built from the model's config.

euler is the model's own FlowMatchEulerDiscreteScheduler. The DPM-Solver++ 2M ones live in
flux_kontext.schedulers: they keep FLUX's shifted flow sigmas (dynamic shift mu included) and work inside the
unmodified FluxKontextPipeline. Accuracy on closed-form flows: tests/test_scheduler_accuracy.py.
"""

from __future__ import annotations

import contextlib

from diffusers import FlowMatchEulerDiscreteScheduler

from flux_kontext.jobs import DEFAULT_DPM, SCHEDULER_DEFAULT_STEPS, SCHEDULERS
from flux_kontext.optimizations import OptimizationContext, Report
from flux_kontext.schedulers import FlowDPMSolverKarrasScheduler, FlowDPMSolverMultistepScheduler

NAME = "dpm_solver"
_CLASSES = {
    "euler": FlowMatchEulerDiscreteScheduler,
    "dpmpp_2m": FlowDPMSolverMultistepScheduler,
    "dpmpp_2m_karras": FlowDPMSolverKarrasScheduler,
}
# 2M at 14 steps is at least as accurate as Euler at 28 on unit-scale data, though not on narrow modes at
# 1024px (BENCHMARKS.md, bench/scheduler_accuracy.py).
DEFAULT_STEPS = SCHEDULER_DEFAULT_STEPS


def make_scheduler(name: str, model_config: dict):
    """A new scheduler for one request; ``model_config`` is the loaded pipeline's scheduler config."""
    if name not in _CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return _CLASSES[name].from_config(dict(model_config))


def apply(pipe, context: OptimizationContext) -> Report:
    """Check the loaded scheduler is the model's flow-matching Euler one; its config seeds every scheduler."""
    kind = type(pipe.scheduler).__name__
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        return Report(NAME, "failed", f"loaded scheduler is {kind}; expected FlowMatchEulerDiscreteScheduler")
    config = dict(pipe.scheduler.config)
    for name in SCHEDULERS:  # a config a scheduler cannot take fails here at load, not on the first request
        trial = make_scheduler(name, config)
        trial.set_timesteps(2, sigmas=[1.0, 0.5], mu=1.0)  # the pipeline's call: custom sigmas plus the shift mu
    listed = ", ".join(f"{name} ({DEFAULT_STEPS[name]} steps)" for name in SCHEDULERS)
    return Report(
        NAME,
        "applied",
        f"default {DEFAULT_DPM}; available: {listed}; new instance per request",
        flag="use_dpm_solver",
        # Per request the engine picks the scheduler; turning DPM off means euler, nothing to undo here.
        disable=contextlib.nullcontext,
    )
