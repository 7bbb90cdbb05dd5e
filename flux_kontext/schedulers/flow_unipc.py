"""UniPC (bh2, order 2) on a tapered-shift flow schedule: the default few-step solver.

The solver is diffusers' own ``UniPCMultistepScheduler`` (flow sigmas, flow prediction, its defaults including
``lower_order_final``): one model call per step, a second-order predictor, and the UniC corrector that reuses the
next step's model output, so the corrector costs no extra call. This class only (a) builds the schedule below,
(b) keeps the timesteps as unrounded floats (sigma * 1000; diffusers truncates them to integers, and the
transformer sees timestep / 1000) and (c) runs the update in float32 whatever the latents' dtype.

The schedule. FLUX's dynamic shift maps the pipeline's u = linspace(1, 1/n, n) to
sigma = e^mu / (e^mu + 1/u - 1); the shift grows with the image's token count because at high resolution the
composition is decided at high noise (tests/flow_problems.py's high-dimensional mixtures show the same: the
unshifted schedule is several times worse there). Near sigma = 0 the full shift leaves one wide first-order step
(0.2 -> 0 at 14 steps, 1024 px), which dominates the error on narrow modes. The tapered shift uses
mu(u) = mu * u^p + mu_low * (1 - u^p): the model's shift at high noise, relaxing to ``mu_low`` near sigma = 0.
p and mu_low were chosen on the closed-form suite (BENCHMARKS.md, "Solver fidelity").

The update's coefficients on the host. diffusers computes UniPC's scalars (lambda, h, the B(h) terms, the
corrector's 2x2 solve) as device tensors: each step copies sigmas to the GPU and ``torch.linalg.solve`` checks its
result on the host, a synchronization that leaves the GPU idle while the next step is launched (about 5.6 ms a
step on an H200 against DPM-Solver++, BENCHMARKS.md "Start-up"). They depend on the schedule alone, so here they
are Python floats (float64) computed from the CPU sigmas, and the tensors only see multiply-adds: the same update
(the order-2 bh2 predictor and corrector with x0 prediction this class configures), without a synchronization.
Any other configuration takes diffusers' code.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

log = logging.getLogger(__name__)

TAPER_POWER = 3.0  # p: how fast the shift relaxes from high noise (u = 1) towards sigma = 0
LOW_NOISE_MU = -0.25  # mu_low: the shift's exponent at the low-noise end
# Keys FluxKontextPipeline reads from scheduler.config to compute mu; UniPC's __init__ does not take them.
PIPELINE_SHIFT_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")


def tapered_shift_sigmas(u: np.ndarray, mu: float, power: float = TAPER_POWER, mu_low: float = LOW_NOISE_MU):
    """Descending flow sigmas (no final 0) from the pipeline's u in (0, 1]: FLUX's shift with mu tapered by u."""
    u = np.asarray(u, dtype=np.float64)
    weight = u**power
    mu_u = mu * weight + mu_low * (1.0 - weight)
    return np.exp(mu_u) / (np.exp(mu_u) + 1.0 / u - 1.0)


class FlowUniPCScheduler(UniPCMultistepScheduler):
    """diffusers' UniPC-2 (bh2) on the tapered-shift sigmas, float timesteps, float32 updates."""

    @classmethod
    def from_config(cls, config=None, **kwargs):
        """From the model's FlowMatchEuler config: flow sigmas and flow prediction, the pipeline's shift keys kept."""
        config = dict(config or {})
        # The shift is always applied here from the pipeline's mu (it passes one for every model), so UniPC's own
        # static ``flow_shift`` path is never taken.
        flow = dict(
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            solver_order=2,
            solver_type="bh2",
            use_dynamic_shifting=True,
            time_shift_type="exponential",
        )
        # FlowMatchEuler's own keys are not UniPC's: dropped here (diffusers would warn on every request), and the
        # ones the pipeline reads to compute mu registered again below.
        euler_only = ("shift", *PIPELINE_SHIFT_KEYS)
        unipc_config = {key: value for key, value in config.items() if key not in euler_only}
        scheduler = super().from_config({**unipc_config, **flow}, **kwargs)
        scheduler.register_to_config(**{key: config[key] for key in PIPELINE_SHIFT_KEYS if key in config})
        return scheduler

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """The pipeline's call: ``sigmas`` = its u grid (linspace(1, 1/n, n)) and the dynamic shift ``mu``."""
        if timesteps is not None:
            raise ValueError("custom timesteps are not supported by the UniPC scheduler; pass sigmas")
        if mu is None:
            raise ValueError("the UniPC scheduler needs the pipeline's dynamic shift `mu`")
        if sigmas is None:
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        shifted = tapered_shift_sigmas(np.asarray(sigmas, dtype=np.float64), float(mu))
        # mu = 0 makes UniPC's own exponential shift the identity; it then appends the final 0 and resets its state.
        super().set_timesteps(sigmas=shifted, mu=0.0, device=device)
        self.timesteps = (self.sigmas[:-1] * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        log.debug("%s: %d steps, sigmas %s", type(self).__name__, len(self.timesteps), self.sigmas.tolist())

    def _host_update(self, order: int | None) -> bool:
        return (
            self.config.solver_type == "bh2"
            and self.predict_x0
            and self.config.use_flow_sigmas
            and self.solver_p is None
            and order in (1, 2)
        )

    def _lambda(self, index: int) -> float:
        """log(alpha / sigma) at sigma index ``index``, from the CPU sigmas (no device access); -inf at sigma 0."""
        sigma = float(self.sigmas[index])
        return math.inf if sigma == 0.0 else math.log((1.0 - sigma) / sigma)

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        """UniP (bh2): the predictor from x0 predictions at s0 (and s1 for order 2) to t."""
        last = self.step_index is not None and float(self.sigmas[self.step_index + 1]) == 0.0
        if args or kwargs or sample is None or not self._host_update(order) or (last and order == 2):
            return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)
        index = self.step_index
        sigma_t, sigma_s0 = float(self.sigmas[index + 1]), float(self.sigmas[index])
        h = self._lambda(index + 1) - self._lambda(index)
        b_h = math.expm1(-h)  # bh2: B(h) = h·phi_1(h) = e^-h - 1 (x0 prediction)
        m0 = self.model_outputs[-1]
        x_t = sample * (sigma_t / sigma_s0) - m0 * ((1.0 - sigma_t) * b_h)
        if order == 2:  # D1 = (m1 - m0) / r1 with rho = 1/2
            r1 = (self._lambda(index - 1) - self._lambda(index)) / h
            x_t = x_t - (self.model_outputs[-2] - m0) * ((1.0 - sigma_t) * b_h * 0.5 / r1)
        return x_t.to(sample.dtype)

    def multistep_uni_c_bh_update(
        self, this_model_output, *args, last_sample=None, this_sample=None, order=None, **kwargs
    ):
        """UniC (bh2): corrects the sample at t with the model's x0 prediction there (no extra model call)."""
        if args or kwargs or last_sample is None or this_sample is None or not self._host_update(order):
            return super().multistep_uni_c_bh_update(
                this_model_output, *args, last_sample=last_sample, this_sample=this_sample, order=order, **kwargs
            )
        index = self.step_index
        sigma_t, sigma_s0 = float(self.sigmas[index]), float(self.sigmas[index - 1])
        h = self._lambda(index) - self._lambda(index - 1)
        hh = -h
        b_h = math.expm1(hh)
        m0 = self.model_outputs[-1]
        x_t = last_sample * (sigma_t / sigma_s0) - m0 * ((1.0 - sigma_t) * b_h)
        d1_t = this_model_output - m0
        if order == 1:
            return (x_t - d1_t * ((1.0 - sigma_t) * b_h * 0.5)).to(last_sample.dtype)
        # order 2: rho from R rho = b, R = [[1, 1], [r1, 1]], b_k = k! (phi_k-ish terms) / B(h), as diffusers builds
        r1 = (self._lambda(index - 2) - self._lambda(index - 1)) / h
        phi_1 = b_h / hh - 1.0
        phi_2 = phi_1 / hh - 0.5
        rho = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), np.array([phi_1 / b_h, 2.0 * phi_2 / b_h]))
        d1 = (self.model_outputs[-2] - m0) / r1
        x_t = x_t - (d1 * float(rho[0]) + d1_t * float(rho[1])) * ((1.0 - sigma_t) * b_h)
        return x_t.to(last_sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """UniPC's step with float32 (or float64) arithmetic; the result in the model output's dtype."""
        dtype = torch.promote_types(sample.dtype, torch.float32)
        (prev_sample,) = super().step(model_output.to(dtype), timestep, sample.to(dtype), return_dict=False)
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
