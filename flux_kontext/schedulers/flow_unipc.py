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
"""

from __future__ import annotations

import logging

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

    def _host_coefficients(self, t_index: int, s0_index: int, si_index: int | None, order: int, corrector: bool):
        """diffusers' UniP / UniC scalars (bh2, x0 prediction, order <= 2) for sigma_t = sigmas[t_index],
        sigma_s0 = sigmas[s0_index] and, at order 2, the older sigmas[si_index]; on CPU float32 0-d tensors, the ops
        of diffusers in its order, returned as Python floats: (sigma_t / sigma_s0, alpha_t·h_phi_1, alpha_t·B_h,
        rk, rhos) with rhos = (rho_p,) for the predictor and (rho_1, rho_t) or (rho_t,) for the corrector."""
        sigmas = self.sigmas.cpu()

        def lam(index):
            alpha, sigma = self._sigma_to_alpha_sigma_t(sigmas[index])
            return alpha, sigma, torch.log(alpha) - torch.log(sigma)

        alpha_t, sigma_t, lambda_t = lam(t_index)
        _, sigma_s0, lambda_s0 = lam(s0_index)
        h = lambda_t - lambda_s0
        rks = [(lam(si_index)[2] - lambda_s0) / h] if order == 2 else []
        rks.append(torch.ones((), dtype=h.dtype))
        rks = torch.stack(rks)
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        B_h = torch.expm1(hh)
        factorial_i, R, b = 1, [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        if not corrector or order == 1:
            rhos = (0.5,)
        else:
            rhos = tuple(float(r) for r in torch.linalg.solve(torch.stack(R), torch.stack(b)))
        rk = float(rks[0]) if order == 2 else None
        return float(sigma_t / sigma_s0), float(alpha_t * h_phi_1), float(alpha_t * B_h), rk, rhos

    def _host_math(self, order: int) -> bool:
        """The configurations ``_host_coefficients`` reproduces; others keep diffusers' device arithmetic."""
        config = self.config
        return (
            order <= 2
            and config.solver_type == "bh2"
            and self.predict_x0
            and not self.solver_p
            and config.solver_order <= 2
        )

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        """UniP (the predictor) with host coefficients (see the module's docstring); diffusers' otherwise."""
        if sample is None or order is None or args or not self._host_math(order):
            return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)
        i = self.step_index
        ratio, alpha_phi, alpha_b, rk, (rho,) = self._host_coefficients(i + 1, i, i - 1, order, corrector=False)
        m0 = self.model_outputs[-1]
        x_t = ratio * sample - alpha_phi * m0
        if order == 2:
            x_t = x_t - alpha_b * (rho * ((self.model_outputs[-2] - m0) / rk))
        return x_t.to(sample.dtype)

    def multistep_uni_c_bh_update(self, this_model_output, *args, last_sample=None, this_sample=None, order=None, **kw):
        """UniC (the corrector) with host coefficients (see the module's docstring); diffusers' otherwise."""
        if last_sample is None or this_sample is None or order is None or args or not self._host_math(order):
            return super().multistep_uni_c_bh_update(
                this_model_output, *args, last_sample=last_sample, this_sample=this_sample, order=order, **kw
            )
        i = self.step_index
        ratio, alpha_phi, alpha_b, rk, rhos = self._host_coefficients(i, i - 1, i - 2, order, corrector=True)
        m0 = self.model_outputs[-1]
        x_t = ratio * last_sample - alpha_phi * m0
        correction = rhos[-1] * (this_model_output - m0)
        if order == 2:
            correction = rhos[0] * ((self.model_outputs[-2] - m0) / rk) + correction
        return (x_t - alpha_b * correction).to(last_sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """UniPC's step with float32 (or float64) arithmetic; the result in the model output's dtype."""
        dtype = torch.promote_types(sample.dtype, torch.float32)
        (prev_sample,) = super().step(model_output.to(dtype), timestep, sample.to(dtype), return_dict=False)
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
