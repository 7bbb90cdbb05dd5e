"""Accuracy of the schedulers on rectified flows whose velocity field is known in closed form.

Every solve drives the same path as FluxKontextPipeline: make_scheduler from FLUX's scheduler config,
retrieve_timesteps(sigmas=linspace(1, 1/n, n), mu=calculate_shift(...)), set_begin_index(0), then per timestep the
"model" is evaluated at sigma = t / 1000 and scheduler.step(v, t, x, return_dict=False). Everything is float64.

Flow: x_sigma = (1 - sigma) x0 + sigma n, n ~ N(0, I); the exact velocity is v(x, sigma) = E[n - x0 | x_sigma = x].
Gaussian data x0 ~ N(m, s^2) per dimension: x_sigma ~ N((1 - sigma) m, V) with V = (1 - sigma)^2 s^2 + sigma^2 and
Cov(n - x0, x_sigma) = sigma - (1 - sigma) s^2, so v = -m + (sigma - (1 - sigma) s^2) / V * (x - (1 - sigma) m).
The ODE dx/dsigma = v keeps z = (x - (1 - sigma) m) / sqrt(V) constant (d sqrt(V)/dsigma = (sigma - (1-sigma) s^2)
/ sqrt(V)), so the map from sigma = 1 (V = 1) to sigma = 0 is x0 = m + s * x1. A mixture's velocity is the
responsibility-weighted sum of its components' Gaussian velocities; its reference is RK4 in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps

from flux_kontext.schedulers import DEFAULT_DPM, SCHEDULERS, make_scheduler
from flux_kontext.schedulers import SCHEDULER_DEFAULT_STEPS as DEFAULT_STEPS

# FLUX.1's own scheduler config (the model's scheduler_config.json), written out so the test does not trust ours.
FLUX_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# The pipeline's mu for 1024x1024 (4096 latent tokens: the largest shift) and 512x512 (1024 tokens).
MU = {"1024px": calculate_shift(4096, 256, 4096, 0.5, 1.15), "512px": calculate_shift(1024, 256, 4096, 0.5, 1.15)}
Velocity = Callable[[np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class Problem:
    name: str
    velocity: Velocity
    x1: np.ndarray  # pure noise at sigma = 1
    exact: np.ndarray  # the ODE's value at sigma = 0


def gaussian_velocity(m: np.ndarray, s: np.ndarray) -> Velocity:
    def v(x: np.ndarray, sigma: float) -> np.ndarray:
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        return -m + (sigma - (1 - sigma) * s**2) / var * (x - (1 - sigma) * m)

    return v


def mixture_velocity(means: np.ndarray, stds: np.ndarray, weights: np.ndarray) -> Velocity:
    """Isotropic components N(means[k], stds[k]^2 I): v = sum_k P(k | x_sigma) * (component k's velocity)."""
    dim = means.shape[1]

    def v(x: np.ndarray, sigma: float) -> np.ndarray:
        var = (1 - sigma) ** 2 * stds**2 + sigma**2  # (K,)
        diff = x[:, None, :] - (1 - sigma) * means[None]  # (B, K, D)
        logp = np.log(weights) - 0.5 * dim * np.log(var) - 0.5 * (diff**2).sum(-1) / var
        resp = np.exp(logp - logp.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)
        gain = (sigma - (1 - sigma) * stds**2) / var
        return (resp[..., None] * (-means[None] + gain[None, :, None] * diff)).sum(axis=1)

    return v


def rk4(velocity: Velocity, x: np.ndarray, steps: int) -> np.ndarray:
    """Classical RK4 from sigma = 1 to 0 on a uniform grid (the reference, error O(h^4))."""
    h = -1.0 / steps
    for i in range(steps):
        s = 1.0 - i / steps
        k1 = velocity(x, s)
        k2 = velocity(x + h / 2 * k1, s + h / 2)
        k3 = velocity(x + h / 2 * k2, s + h / 2)
        k4 = velocity(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def gaussian_problem() -> Problem:
    dim = 8
    m, s = np.linspace(-1.5, 1.5, dim), np.linspace(0.3, 1.2, dim)
    x1 = np.random.default_rng(0).standard_normal((512, dim))
    return Problem("gaussian", gaussian_velocity(m, s), x1, m + s * x1)


MIXTURE_MEANS = np.array([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]])
MIXTURE_WEIGHTS = np.array([0.3, 0.5, 0.2])


@functools.cache
def mixture_problem(stds: tuple[float, ...] = (0.6, 0.8, 0.7), name: str = "mixture") -> Problem:
    velocity = mixture_velocity(MIXTURE_MEANS, np.array(stds), MIXTURE_WEIGHTS)
    x1 = np.random.default_rng(1).standard_normal((256, 2))
    return Problem(name, velocity, x1, rk4(velocity, x1, 800))


def solve(name: str, steps: int, problem: Problem, mu: float) -> np.ndarray:
    """Integrate from noise to data exactly as FluxKontextPipeline drives the scheduler."""
    scheduler = make_scheduler(name, FLUX_SCHEDULER_CONFIG)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    x = torch.from_numpy(problem.x1.copy())
    for t in timesteps:
        v = torch.from_numpy(problem.velocity(x.numpy(), float(t) / 1000))  # the model sees t / 1000
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x.numpy()


def error(name: str, steps: int, problem: Problem, mu: float) -> float:
    """RMS distance to the exact sigma = 0 solution."""
    return float(np.sqrt(np.mean((solve(name, steps, problem, mu) - problem.exact) ** 2)))


# --- the references are right -------------------------------------------------------------------------------


def test_gaussian_velocity_is_the_conditional_mean():
    """Least-squares regression of n - x0 on x_sigma (exact for jointly Gaussian) recovers the closed form."""
    rng = np.random.default_rng(2)
    m, s = np.array([0.7, -1.2]), np.array([0.4, 1.3])
    x0, noise = m + s * rng.standard_normal((400_000, 2)), rng.standard_normal((400_000, 2))
    v = gaussian_velocity(m, s)
    for sigma in (0.2, 0.5, 0.9):
        xs = (1 - sigma) * x0 + sigma * noise
        for d in range(2):
            slope, intercept = np.polyfit(xs[:, d], noise[:, d] - x0[:, d], 1)
            at0, at1 = v(np.zeros(2), sigma)[d], v(np.ones(2), sigma)[d]
            assert abs(intercept - at0) < 0.01 and abs(slope - (at1 - at0)) < 0.01


def test_exact_gaussian_map_solves_the_ode():
    problem = gaussian_problem()
    assert np.max(np.abs(rk4(problem.velocity, problem.x1, 400) - problem.exact)) < 1e-9


def test_mixture_reference_is_converged_and_reduces_to_the_gaussian():
    problem = mixture_problem()
    assert np.max(np.abs(rk4(problem.velocity, problem.x1, 400) - problem.exact)) < 1e-8
    one = mixture_velocity(np.array([[0.3, -0.4]]), np.array([0.8]), np.array([1.0]))
    x = np.random.default_rng(3).standard_normal((16, 2))
    np.testing.assert_allclose(one(x, 0.37), gaussian_velocity(np.array([0.3, -0.4]), np.full(2, 0.8))(x, 0.37))


# --- the solvers ---------------------------------------------------------------------------------------------

PROBLEMS = {"gaussian": gaussian_problem, "mixture": mixture_problem}


@pytest.mark.parametrize("resolution", sorted(MU))
@pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
def test_dpmpp_2m_beats_euler(problem_name, resolution):
    problem, mu = PROBLEMS[problem_name](), MU[resolution]
    euler = {n: error("euler", n, problem, mu) for n in (7, 14, 28)}
    dpm = {n: error("dpmpp_2m", n, problem, mu) for n in (7, 14)}
    assert dpm[7] < euler[7] and dpm[14] < euler[14]
    assert dpm[14] <= euler[28], (dpm, euler)  # the claim behind DEFAULT_STEPS: 14 DPM steps for 28 Euler


@pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
def test_observed_orders(problem_name):
    """Error ratio when the steps double: 2 for Euler (error ~ h), ~4 for 2M (error ~ h^2, up to a log).

    The pipeline's sigmas are uniform near 0, so the last few 2M steps span O(1) in lam; the i-th from the end adds
    O(1 / (i n^2)), so the error is ~ log(n) / n^2 and the ratio tends to 4 only as 4 log(n) / log(2n) (3.56 at
    n = 256; measured 3.2-3.3 here, 3.45 at 1024 -> 2048). A first-order solver would give 2.
    """
    problem, mu = PROBLEMS[problem_name](), MU["1024px"]
    for name, low, high in (("euler", 1.9, 2.1), ("dpmpp_2m", 2.9, 4.2)):
        ratio = error(name, 256, problem, mu) / error(name, 512, problem, mu)
        assert low < ratio < high, (name, ratio)


def test_karras_schedule_is_valid_and_accurate():
    steps, mu = 14, MU["1024px"]
    shifted = make_scheduler("euler", FLUX_SCHEDULER_CONFIG)
    shifted.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    karras = make_scheduler("dpmpp_2m_karras", FLUX_SCHEDULER_CONFIG)
    karras.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sig, ref = karras.sigmas.double().numpy(), shifted.sigmas.double().numpy()
    assert len(sig) == steps + 1 and np.all(np.diff(sig) < 0)
    assert sig[0] == ref[0] == 1.0 and sig[-1] == 0.0 and sig[-2] == pytest.approx(ref[-2], rel=1e-6)
    assert not np.allclose(sig, ref)  # it really re-spaces
    # Karras: nsr^(1/7) is evenly spaced over the finite part (all but the sigma = 1 start and the final 0).
    assert np.ptp(np.diff((sig[1:-1] / (1 - sig[1:-1])) ** (1 / 7))) < 1e-5
    for problem in (gaussian_problem(), mixture_problem()):
        for n in (7, 14, 28):
            assert error("dpmpp_2m_karras", n, problem, mu) < error("euler", n, problem, mu)


def test_step_is_dpm_solver_pp_2m():
    """Three steps against Lu et al. 2022 Alg. 2 written with lam and exp(-h); first and last steps are DDIM."""
    scheduler = make_scheduler("dpmpp_2m", FLUX_SCHEDULER_CONFIG)
    scheduler.set_timesteps(4, sigmas=np.linspace(1.0, 0.25, 4), mu=0.8)
    scheduler.set_begin_index(0)
    sig = scheduler.sigmas.double().numpy()
    rng = np.random.default_rng(4)
    x = rng.standard_normal(6)
    lam = lambda s: np.log((1 - s) / s)  # noqa: E731
    expected, prev_x0 = x.copy(), None
    for i, t in enumerate(scheduler.timesteps):
        v = rng.standard_normal(6)
        x = scheduler.step(torch.from_numpy(v), t, torch.from_numpy(x), return_dict=False)[0].numpy()
        s, s_next = sig[i], sig[i + 1]
        x0 = expected - s * v
        if i == 0:  # from sigma = 1: DDIM, which for rectified flow is the Euler step
            expected = expected + (s_next - s) * v
        elif i == 1:  # the previous lam is -inf, so the 2M correction vanishes
            h = lam(s_next) - lam(s)
            expected = s_next / s * expected - (1 - s_next) * np.expm1(-h) * x0
        elif s_next > 0:
            h, h_prev = lam(s_next) - lam(s), lam(s) - lam(sig[i - 1])
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
            expected = s_next / s * expected - (1 - s_next) * np.expm1(-h) * d
        else:  # to sigma = 0: x0 itself
            expected = x0
        prev_x0 = x0
        np.testing.assert_allclose(x, expected, rtol=1e-12, atol=1e-12)
    assert i == 3


# --- the factory and the pipeline contract -------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        make_scheduler("dpmpp_3m", FLUX_SCHEDULER_CONFIG)
    assert "dpmpp_3m" in str(info.value) and all(name in str(info.value) for name in SCHEDULERS)


def test_names_and_defaults():
    assert set(SCHEDULERS) == {"euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc"} == set(DEFAULT_STEPS)
    assert DEFAULT_DPM == "unipc"  # the default few-step solver: tests/test_scheduler_fidelity.py says why
    assert DEFAULT_STEPS == {"euler": 28, "dpmpp_2m": 14, "dpmpp_2m_karras": 14, "unipc": 14}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_fresh_instance_per_call(name):
    a, b = make_scheduler(name, FLUX_SCHEDULER_CONFIG), make_scheduler(name, FLUX_SCHEDULER_CONFIG)
    assert a is not b
    b_timesteps = b.timesteps.clone()
    a.set_timesteps(5, sigmas=np.linspace(1.0, 0.2, 5), mu=1.0)
    a.set_begin_index(0)
    a.step(torch.ones(3, dtype=torch.float64), a.timesteps[0], torch.zeros(3, dtype=torch.float64))
    assert a.step_index == 1 and b.step_index is None and b.begin_index is None
    assert torch.equal(b.timesteps, b_timesteps) and len(b.timesteps) != len(a.timesteps)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_timesteps_are_unrounded_sigma_times_1000(name):
    scheduler = make_scheduler(name, FLUX_SCHEDULER_CONFIG)
    timesteps, _ = retrieve_timesteps(scheduler, 14, "cpu", sigmas=np.linspace(1.0, 1 / 14, 14), mu=MU["1024px"])
    assert timesteps.dtype == torch.float32 and len(timesteps) == 14
    assert not torch.equal(timesteps, timesteps.round())
    assert torch.equal(timesteps, scheduler.sigmas[:-1] * 1000)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_mu_shifts_the_sigmas(name):
    def sigmas(mu):
        scheduler = make_scheduler(name, FLUX_SCHEDULER_CONFIG)
        scheduler.set_timesteps(14, sigmas=np.linspace(1.0, 1 / 14, 14), mu=mu)
        return scheduler.sigmas.double().numpy()

    high, low = sigmas(MU["1024px"]), sigmas(MU["512px"])
    assert np.all(high[1:-1] > low[1:-1])  # more shift keeps more noise at every step
    if name in ("euler", "dpmpp_2m"):  # the model's own exponential time shift of the pipeline's linspace
        u = np.linspace(1.0, 1 / 14, 14)
        expected = np.exp(MU["1024px"]) / (np.exp(MU["1024px"]) + 1 / u - 1)
        np.testing.assert_allclose(high[:-1], expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "unipc"])
def test_dpm_needs_mu_and_keeps_latent_dtype(name):
    scheduler = make_scheduler(name, FLUX_SCHEDULER_CONFIG)
    with pytest.raises(ValueError):
        scheduler.set_timesteps(14, sigmas=np.linspace(1.0, 1 / 14, 14))  # dynamic shifting needs mu
    scheduler.set_timesteps(14, sigmas=np.linspace(1.0, 1 / 14, 14), mu=1.0)
    scheduler.set_begin_index(0)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    for t in scheduler.timesteps[:3]:
        x = scheduler.step(torch.randn(2, 4, dtype=torch.bfloat16), t, x, return_dict=False)[0]
    assert x.dtype == torch.bfloat16 and torch.isfinite(x.float()).all() and scheduler.order == 1
