"""Schedulers: a fresh instance per request (schedulers are stateful), built from the model's config."""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler

from flux_kontext.optimizations import OptimizationContext, Report

NAME = "scheduler"
DEFAULT_STEPS = {"euler": 28}
SCHEDULERS = tuple(DEFAULT_STEPS)


def make_scheduler(name: str, model_config: dict):
    """A new scheduler for one request; ``model_config`` is the loaded pipeline's scheduler config."""
    if name != "euler":
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return FlowMatchEulerDiscreteScheduler.from_config(model_config)


def apply(pipe, context: OptimizationContext) -> Report:
    """Check that the loaded scheduler is the flow-matching Euler one the model was trained with."""
    kind = type(pipe.scheduler).__name__
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        return Report(NAME, "failed", f"loaded scheduler is {kind}; expected FlowMatchEulerDiscreteScheduler")
    return Report(NAME, "applied", "euler (FlowMatchEulerDiscreteScheduler, the model's own), new instance per request")
