"""The default few-step solver against the references on the closed-form suite (tests/flow_problems.py).

The claim behind the default: at 8, 10, 12, 14 and 20 steps, for mu from 0.5 to 1.15, on every problem of the
suite, the default solver is at least as accurate as Euler at 28 steps and as diffusers' DPMSolverMultistepScheduler
(2M, flow sigmas, dynamic shift, its defaults) at the same step count. On the 64-dim problems (the modes separate
at high noise, as at high resolution) it beats diffusers' DPM at every step count, and Euler@28 from 12 steps; at 8
and 10 steps it is level with Euler@28 there (BENCHMARKS.md, "Solver fidelity"). Deterministic float64 numerics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_timesteps

from flux_kontext.schedulers import DEFAULT_SOLVER, SCHEDULER_DEFAULT_STEPS, make_scheduler
from flux_kontext.schedulers.flow_unipc import FlowUniPCScheduler, tapered_shift_sigmas
from tests import flow_problems as fp
from tests.test_scheduler_accuracy import FLUX_SCHEDULER_CONFIG

PROBLEMS = {problem.name: problem for problem in fp.suite()}
SUITE = [name for name, problem in PROBLEMS.items() if problem.group == "2d"]
HIGH_DIM = [name for name, problem in PROBLEMS.items() if problem.group == "high-dim"]
LEVEL = 1.05  # "level with": within 5%


def test_reference_transport_is_converged():
    problem = PROBLEMS["mixture std 0.02-0.1"]  # the sharpest modes: the hardest for the reference too
    finer = fp.rk4_dense_near_zero(problem.velocity, problem.x1, 2 * fp.REFERENCE_STEPS)
    assert np.max(np.abs(finer - problem.exact)) < 1e-8


def test_reference_solvers_are_what_they_claim():
    """The diffusers DPM reference is really second order where it should be: it beats Euler at equal steps."""
    problem, mu = PROBLEMS["mixture std 0.6-0.8"], 0.8
    for steps in (10, 20):
        assert fp.diffusers_dpm_error(steps, problem, mu) < 0.5 * fp.service_error("euler", steps, problem, mu)


def test_default_is_the_few_step_solver():
    assert DEFAULT_SOLVER == "unipc" and SCHEDULER_DEFAULT_STEPS[DEFAULT_SOLVER] == 14


@pytest.mark.parametrize("mu", fp.MUS)
@pytest.mark.parametrize("problem_name", SUITE)
def test_default_beats_euler_28_and_diffusers_dpm(problem_name, mu):
    problem = PROBLEMS[problem_name]
    euler28 = fp.euler_reference_error(problem, mu)
    for steps in fp.STEPS:
        default = fp.service_error(DEFAULT_SOLVER, steps, problem, mu)
        dpm = fp.diffusers_dpm_error(steps, problem, mu)
        assert default <= euler28, (steps, default, euler28)
        assert default <= dpm, (steps, default, dpm)


@pytest.mark.parametrize("mu", (0.5, 0.8, 1.15))
@pytest.mark.parametrize("problem_name", HIGH_DIM)
def test_high_dimensional_modes(problem_name, mu):
    problem = PROBLEMS[problem_name]
    euler28 = fp.euler_reference_error(problem, mu)
    for steps in fp.STEPS:
        default = fp.service_error(DEFAULT_SOLVER, steps, problem, mu)
        assert default <= fp.diffusers_dpm_error(steps, problem, mu), steps
        assert default <= (euler28 if steps >= 12 else LEVEL * euler28), (steps, default, euler28)


def test_high_dimensional_modes_need_the_resolution_shift():
    """Why the schedule keeps FLUX's shift at high noise: dropping it wins on 2-dim toys and loses here."""
    problem, mu, steps = PROBLEMS["64-dim mixture std 0.05-0.6"], 1.15, 8
    flat = tapered_shift_sigmas(np.linspace(1.0, 1 / steps, steps), -0.25, power=0.0)
    assert fp.diffusers_unipc_error(steps, problem, 0.0, u=flat) > 1.5 * fp.service_error(
        DEFAULT_SOLVER, steps, problem, mu
    )


# --- the schedule and the pipeline contract --------------------------------------------------------------------


def unipc_sigmas(steps: int, mu: float) -> np.ndarray:
    scheduler = make_scheduler(DEFAULT_SOLVER, FLUX_SCHEDULER_CONFIG)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.double().numpy()


def test_tapered_schedule_keeps_the_shift_at_high_noise_and_relaxes_it_near_zero():
    steps, mu = 14, 1.15
    sig = unipc_sigmas(steps, mu)
    u = np.linspace(1.0, 1 / steps, steps)
    flux = np.exp(mu) / (np.exp(mu) + 1 / u - 1)
    assert len(sig) == steps + 1 and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)
    assert sig[0] == pytest.approx(1.0, abs=1e-5)
    assert sig[1] == pytest.approx(flux[1], rel=0.02)  # high noise: FLUX's own shift
    assert sig[-2] < 0.5 * flux[-1]  # the last step to 0 starts much closer to 0
    assert np.all(unipc_sigmas(steps, 1.15)[1:-1] > unipc_sigmas(steps, 0.5)[1:-1])  # still resolution-aware


def test_unipc_timesteps_are_float_sigma_times_1000_and_the_model_config_is_kept():
    scheduler = make_scheduler(DEFAULT_SOLVER, FLUX_SCHEDULER_CONFIG)
    timesteps, n = retrieve_timesteps(scheduler, 14, "cpu", sigmas=np.linspace(1.0, 1 / 14, 14), mu=1.15)
    assert n == 14 and not np.array_equal(timesteps.numpy(), timesteps.round().numpy())
    np.testing.assert_allclose(timesteps.numpy(), scheduler.sigmas[:-1].numpy() * 1000, rtol=1e-6)
    # the pipeline computes mu from these keys of scheduler.config
    for key in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift"):
        assert scheduler.config[key] == FLUX_SCHEDULER_CONFIG[key]


class DiffusersUniPCUpdates(FlowUniPCScheduler):
    """The same scheduler with diffusers' own predictor and corrector (device-tensor coefficients)."""

    multistep_uni_p_bh_update = UniPCMultistepScheduler.multistep_uni_p_bh_update
    multistep_uni_c_bh_update = UniPCMultistepScheduler.multistep_uni_c_bh_update


@pytest.mark.parametrize("steps", [1, 2, 3, 14, 28])
def test_unipc_updates_from_host_coefficients_match_diffusers_own(steps):
    """The host-side coefficients give diffusers' UniPC update: same latents after every step, to float32 rounding."""
    config = dict(FLUX_SCHEDULER_CONFIG)
    ours, theirs = FlowUniPCScheduler.from_config(config), DiffusersUniPCUpdates.from_config(config)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=1.15)
    generator = torch.Generator().manual_seed(steps)
    sample = torch.randn(1, 64, 16, generator=generator)
    target = torch.randn(1, 64, 16, generator=generator)
    a = b = sample
    for timestep in ours.timesteps:
        velocity = lambda x: x - target + 0.3 * torch.sin(3 * x)  # noqa: E731 (a smooth, nonlinear field)
        a = ours.step(velocity(a), timestep, a, return_dict=False)[0]
        b = theirs.step(velocity(b), timestep, b, return_dict=False)[0]
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    assert not torch.allclose(a, sample)
