"""DPM-Solver++ 2M for FLUX's rectified flow, usable inside the unmodified FluxKontextPipeline.

Why our own class: diffusers' DPMSolverMultistepScheduler rejects the pipeline's ``sigmas=`` argument, rounds
timesteps to integers, and its ``use_karras_sigmas`` with ``use_flow_sigmas`` reads variance-preserving sigmas as
flow sigmas. Subclassing FlowMatchEulerDiscreteScheduler keeps the model's own sigma handling (``sigmas=``, the
dynamic shift ``mu``, float timesteps = sigma * 1000) and replaces only ``step``.

Conventions: x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts v = noise - x0, so the data prediction
is x0 = x - sigma * v. DPM-Solver++ works in lam = log(alpha / sigma) with alpha = 1 - sigma.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

log = logging.getLogger(__name__)

KARRAS_RHO = 7.0  # EDM's rho (Karras et al. 2022, eq. 5)


def flow_karras_sigmas(shifted: np.ndarray, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras spacing for a flow model, from the (descending, all > 0) shifted flow sigmas.

    Derivation. Dividing x_sigma = (1 - sigma) x0 + sigma n by (1 - sigma) gives
    x_sigma / (1 - sigma) = x0 + nsr * n with nsr = sigma / (1 - sigma): the variance-exploding form in which
    EDM defines its sigma. So EDM's sigma is the noise-to-signal ratio nsr, and Karras spacing belongs on nsr:
        nsr_i = (nsr_max^(1/rho) + i/(N-1) * (nsr_min^(1/rho) - nsr_max^(1/rho)))^rho,  i = 0..N-1,
    mapped back by sigma = nsr / (1 + nsr). (Applying the formula to sigma itself, or to VP sigmas, is wrong.)

    Endpoints are the shifted schedule's max and min. The pipeline's top sigma is 1.0 (its latents are pure
    noise), where nsr is infinite; that sigma is kept as the first entry and the Karras ramp spans the other
    N - 1 points, from the largest finite nsr down to the smallest.
    """
    shifted = np.asarray(shifted, dtype=np.float64)
    head, rest = (shifted[:1], shifted[1:]) if shifted[0] >= 1.0 else (shifted[:0], shifted)
    if len(rest) == 0:
        return shifted
    nsr = rest / (1.0 - rest)
    ramp = np.linspace(0.0, 1.0, len(rest))
    hi, lo = nsr[0] ** (1.0 / rho), nsr[-1] ** (1.0 / rho)
    nsr_karras = (hi + ramp * (lo - hi)) ** rho
    return np.concatenate([head, nsr_karras / (1.0 + nsr_karras)])


def _lam(sigma: float) -> float:
    """DPM-Solver's half log-SNR of a flow sigma: log(alpha / sigma), alpha = 1 - sigma."""
    return math.log((1.0 - sigma) / sigma)


class FlowDPMSolverMultistepScheduler(FlowMatchEulerDiscreteScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2, data prediction) on the model's shifted flow sigmas.

    One model call per step, so ``order`` stays 1: the pipeline reads it as calls per step (progress bar only).
    The first step starts at sigma = 1 (lam = -inf) and the last ends at sigma = 0 (lam = +inf); both are
    first-order (DDIM, equal to an Euler step for rectified flow), written without lam so nothing is infinite.
    """

    order = 1
    karras = False  # the subclass below re-spaces the sigmas

    # Multistep memory: the previous step's data prediction and its sigma. Set per run in set_timesteps; no
    # __init__ override, because from_config reads the config keys from __init__'s signature.
    _prev_x0: torch.Tensor | None = None
    _prev_sigma: float | None = None
    _host_sigmas: tuple[float, ...] = ()  # float copy of self.sigmas: step() then never syncs with the GPU

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """The model's own schedule (sigmas, dynamic shift mu, float timesteps), then optional Karras spacing."""
        if self.config.invert_sigmas or self.config.stochastic_sampling:
            raise ValueError("invert_sigmas / stochastic_sampling are not supported by the DPM-Solver++ scheduler")
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        if self.karras:
            if timesteps is not None:
                raise ValueError("custom timesteps cannot be re-spaced; pass sigmas")
            spaced = flow_karras_sigmas(self.sigmas[:-1].double().cpu().numpy())
            spaced = torch.from_numpy(spaced).to(dtype=torch.float32, device=self.sigmas.device)
            self.timesteps = spaced * self.config.num_train_timesteps
            self.sigmas = torch.cat([spaced, torch.zeros(1, device=spaced.device)])
        self._prev_x0 = None
        self._prev_sigma = None
        self._host_sigmas = tuple(self.sigmas.double().cpu().tolist())
        log.debug("%s: %d steps, sigmas %s", type(self).__name__, len(self.timesteps), self._host_sigmas)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Advance ``sample`` from sigmas[i] to sigmas[i+1] given the velocity ``model_output`` at sigmas[i]."""
        if self.step_index is None:
            self._init_step_index(timestep)
        # bf16 latents are upcast as in the Euler scheduler; float64 stays float64 (accuracy tests).
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x, v = sample.to(dtype), model_output.to(dtype)
        s, t = self._host_sigmas[self.step_index], self._host_sigmas[self.step_index + 1]
        x0 = x - s * v

        # DDIM/first-order part: x_t = (s_t/s_s) x + (alpha_t - alpha_s s_t/s_s) x0; this coefficient equals
        # alpha_t (1 - exp(-h)), h = lam_t - lam_s, and is finite at s = 1 and t = 0.
        ratio = t / s
        coef = (1.0 - t) - (1.0 - s) * ratio
        first_order = t == 0.0 or self._prev_x0 is None or self._prev_sigma >= 1.0
        if first_order:
            d = x0
        else:
            h = _lam(t) - _lam(s)
            r = (_lam(s) - _lam(self._prev_sigma)) / h
            d = x0 + (x0 - self._prev_x0) / (2.0 * r)  # (1 + 1/2r) m0 - (1/2r) m1
        prev_sample = ratio * x + coef * d

        self._prev_x0, self._prev_sigma = x0, s
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


class FlowDPMSolverKarrasScheduler(FlowDPMSolverMultistepScheduler):
    """DPM-Solver++(2M) on Karras-spaced noise-to-signal ratios between the shifted schedule's ends."""

    karras = True
