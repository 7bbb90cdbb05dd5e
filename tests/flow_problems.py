"""The closed-form fidelity suite: rectified flows with known velocity, and solves through each scheduler.

Flow: x_sigma = (1 - sigma) x0 + sigma n; the exact velocity of a Gaussian mixture: tests/test_scheduler_accuracy.py
(derivation there). The reference transport from sigma = 1 to 0 is RK4 in float64 on a grid dense near 0
(sigma = (1 - i/N)^3), converged to ~1e-10 (test_scheduler_fidelity.py checks it). Shared by
tests/test_scheduler_fidelity.py and bench/scheduler_accuracy.py so the table and the tests cannot drift apart.

The suite ("2d"): the issue's problems, 2-dim mixtures whose narrowest mode has std 0.6 down to 0.02, and the 8-dim
Gaussian. The "high-dim" problems are 64-dim mixtures whose modes differ in every dimension, so the modes separate
at high noise, as an image's composition does at high resolution: the case FLUX's resolution shift exists for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_timesteps

from flux_kontext.schedulers import make_scheduler
from tests.test_scheduler_accuracy import (
    FLUX_SCHEDULER_CONFIG,
    MIXTURE_MEANS,
    MIXTURE_WEIGHTS,
    gaussian_velocity,
    mixture_velocity,
)

Velocity = Callable[[np.ndarray, float], np.ndarray]
MUS = (0.5, 0.65, 0.8, 1.0, 1.15)  # 0.5: 256 tokens (256 px), 1.15: 4096 tokens (1024 px) and above
STEPS = (8, 10, 12, 14, 20)
REFERENCE_STEPS = 2000
EULER_REFERENCE_STEPS = 28


@dataclass(frozen=True)
class Problem:
    name: str
    group: str  # "2d" (the suite) or "high-dim"
    velocity: Velocity
    x1: np.ndarray  # noise at sigma = 1
    exact: np.ndarray  # the transport's value at sigma = 0


def rk4_dense_near_zero(velocity: Velocity, x: np.ndarray, steps: int = REFERENCE_STEPS) -> np.ndarray:
    grid = (1.0 - np.linspace(0.0, 1.0, steps + 1)) ** 3
    for s, t in zip(grid[:-1], grid[1:], strict=True):
        h = t - s
        k1 = velocity(x, s)
        k2 = velocity(x + h / 2 * k1, s + h / 2)
        k3 = velocity(x + h / 2 * k2, s + h / 2)
        k4 = velocity(x + h * k3, t)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


MIXTURE_STDS = {
    "mixture std 0.6-0.8": (0.6, 0.8, 0.7),
    "mixture std 0.3-0.5": (0.3, 0.5, 0.4),
    "mixture, one mode std 0.05": (0.05, 0.8, 0.3),
    "mixture std 0.02-0.1": (0.02, 0.05, 0.1),
}
HIGH_DIM_STDS = {"64-dim mixture std 0.05-0.6": (0.05, 0.3, 0.6), "64-dim mixture std 0.02-0.4": (0.02, 0.1, 0.4)}


def _mixture(name: str, group: str, means: np.ndarray, stds: tuple[float, ...], samples: int) -> Problem:
    velocity = mixture_velocity(means, np.array(stds), MIXTURE_WEIGHTS)
    x1 = np.random.default_rng(1).standard_normal((samples, means.shape[1]))
    return Problem(name, group, velocity, x1, rk4_dense_near_zero(velocity, x1))


@functools.cache
def suite() -> tuple[Problem, ...]:
    problems = [_mixture(name, "2d", MIXTURE_MEANS, stds, 256) for name, stds in MIXTURE_STDS.items()]
    m, s = np.linspace(-1.5, 1.5, 8), np.linspace(0.3, 1.2, 8)
    x1 = np.random.default_rng(0).standard_normal((512, 8))
    problems.append(Problem("8-dim gaussian std 0.3-1.2", "2d", gaussian_velocity(m, s), x1, m + s * x1))
    means = np.random.default_rng(64).standard_normal((3, 64)) * 0.6
    problems += [_mixture(name, "high-dim", means, stds, 128) for name, stds in HIGH_DIM_STDS.items()]
    return tuple(problems)


def rms(x: np.ndarray, problem: Problem) -> float:
    return float(np.sqrt(np.mean((x - problem.exact) ** 2)))


def drive(scheduler, problem: Problem, sigma_of_step: Callable[[int, float], float]) -> np.ndarray:
    """The pipeline's loop: per timestep the 'model' (the exact velocity) at the step's sigma, then step()."""
    scheduler.set_begin_index(0)
    x = torch.from_numpy(problem.x1.copy())
    for i, t in enumerate(scheduler.timesteps):
        v = torch.from_numpy(problem.velocity(x.numpy(), sigma_of_step(i, float(t))))
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x.numpy()


def service_error(name: str, steps: int, problem: Problem, mu: float, u: np.ndarray | None = None) -> float:
    """The service's scheduler ``name`` driven exactly as FluxKontextPipeline drives it (the model sees t / 1000)."""
    scheduler = make_scheduler(name, FLUX_SCHEDULER_CONFIG)
    u = np.linspace(1.0, 1 / steps, steps) if u is None else u
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=u, mu=mu)
    return rms(drive(scheduler, problem, lambda i, t: t / 1000), problem)


def diffusers_dpm_error(steps: int, problem: Problem, mu: float) -> float:
    """diffusers' DPMSolverMultistepScheduler, 2M, flow sigmas, dynamic shift, its defaults (lower_order_final,
    final_sigmas_type='zero'). It takes no ``sigmas`` and rounds its timesteps to integers, so the 'model' is given
    the scheduler's own float sigma: the reference at its most accurate."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        prediction_type="flow_prediction",
    )
    scheduler.set_timesteps(steps, mu=mu)
    return rms(drive(scheduler, problem, lambda i, t: float(scheduler.sigmas[i])), problem)


def diffusers_unipc_error(steps: int, problem: Problem, mu: float, order: int = 2, u=None) -> float:
    """diffusers' UniPCMultistepScheduler (use_flow_sigmas) on the pipeline's sigmas and shift, given its own sigmas."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        use_flow_sigmas=True,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        prediction_type="flow_prediction",
        solver_order=order,
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps) if u is None else u, mu=mu)
    return rms(drive(scheduler, problem, lambda i, t: float(scheduler.sigmas[i])), problem)


def euler_reference_error(problem: Problem, mu: float) -> float:
    return service_error("euler", EULER_REFERENCE_STEPS, problem, mu)
