"""The default solver's step works out its coefficients on the host (flow_unipc.py): the same samples as diffusers'
device arithmetic, and on a GPU no synchronization inside a step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_timesteps

from flux_kontext.schedulers import make_scheduler
from flux_kontext.schedulers.flow_unipc import FlowUniPCScheduler
from tests.test_scheduler_accuracy import FLUX_SCHEDULER_CONFIG


class DeviceMathUniPC(FlowUniPCScheduler):
    """The same scheduler with diffusers' own predictor and corrector (the arithmetic the host path replaces)."""

    def _host_math(self, order: int) -> bool:
        return False


def _sample(scheduler, steps: int, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """A denoising loop as the pipeline drives it, with a fixed nonlinear 'model': every step's sample."""
    retrieve_timesteps(scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=1.15)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 64, 16, generator=generator).to(device)
    target = torch.randn(2, 64, 16, generator=generator).to(device)
    samples = []
    for t in scheduler.timesteps:
        velocity = x - target + 0.3 * torch.tanh(3 * x) * (t / 1000)  # a flow model's output, bf16 as served
        x = scheduler.step(velocity.to(torch.bfloat16), t, x.to(torch.bfloat16), return_dict=False)[0]
        samples.append(x.float())
    return samples


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 14])
def test_host_coefficients_give_diffusers_samples(steps):
    host = make_scheduler("unipc", FLUX_SCHEDULER_CONFIG)
    device = DeviceMathUniPC.from_config(FLUX_SCHEDULER_CONFIG)
    assert type(host) is FlowUniPCScheduler
    for ours, theirs in zip(_sample(host, steps), _sample(device, steps), strict=True):
        assert float((ours - theirs).abs().max()) <= float(theirs.abs().max()) * 2**-8  # one bf16 step at most


def test_host_coefficients_match_to_float32_rounding_before_the_bf16_cast():
    """Without the bf16 rounding of the result, the two agree to float32 arithmetic (1e-6), step by step."""
    host, device = make_scheduler("unipc", FLUX_SCHEDULER_CONFIG), DeviceMathUniPC.from_config(FLUX_SCHEDULER_CONFIG)
    for scheduler in (host, device):
        retrieve_timesteps(scheduler, 14, "cpu", sigmas=np.linspace(1.0, 1 / 14, 14), mu=1.15)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, 8, dtype=torch.float64, generator=generator).float()
    xs = [x.clone(), x.clone()]
    for t in host.timesteps:
        for i, scheduler in enumerate((host, device)):
            velocity = xs[i] - 0.5 * torch.sin(xs[i])
            xs[i] = scheduler.step(velocity, t, xs[i], return_dict=False)[0]
        assert torch.allclose(xs[0], xs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_a_step_on_the_gpu_does_not_synchronize():
    scheduler = make_scheduler("unipc", FLUX_SCHEDULER_CONFIG)
    retrieve_timesteps(scheduler, 14, "cuda", sigmas=np.linspace(1.0, 1 / 14, 14), mu=1.15)
    x = torch.randn(1, 4096, 64, device="cuda", dtype=torch.bfloat16)
    scheduler.step(x, scheduler.timesteps[0], x, return_dict=False)  # the first step finds its index (one lookup)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in scheduler.timesteps[1:]:
            x = scheduler.step(x * 0.9, t, x, return_dict=False)[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x.float()).all()
