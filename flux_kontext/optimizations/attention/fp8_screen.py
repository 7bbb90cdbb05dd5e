"""The start-up screen that decides whether FA3 in FP8 may serve the loaded weights (FLUX_FP8_ATTENTION=auto)."""

from __future__ import annotations

import torch

from flux_kontext.optimizations.attention.kernels import FA3_FP8, KernelChoice
from flux_kontext.optimizations.attention.selection import TIMING_TOKENS

# The sigmas screened: the first step, two in between and a late, low-noise one (FLUX's 1024² schedules at 14-28 steps
# go from 1.0 to about 0.1-0.2 before the final step). The pipeline passes sigma as the transformer's timestep.
SCREEN_SIGMAS = (1.0, 0.7, 0.4, 0.1)
WORST = 5  # the (layer, sigma) pairs listed by name in the report


@torch.inference_mode()
def screen_fp8_attention(transformer, choice: KernelChoice, sigmas=SCREEN_SIGMAS) -> dict:
    """FA3 in FP8 against the active bf16 kernel on the loaded weights, at several sigmas of a 1024² text-to-image
    step (eager): the relative error of every layer's attention output (both kernels on the same q, k, v, as the
    model produces them; q and k with the static scales serving uses) and of the transformer's output, per sigma.

    The per-layer errors decide: on random weights the output barely depends on attention (zeroing it moves the tiny
    model's output by 2%), so the output error alone would prove nothing. The latents are the same random draw at
    every sigma (no data to noise); what changes is the time embedding's modulation of every block."""
    from flux_kontext.models import step_inputs

    bf16, fp8 = choice.kernels[choice.active], choice.kernels[FA3_FP8]
    parameter = next(transformer.parameters())
    inputs = step_inputs(transformer.config, parameter.device, parameter.dtype, TIMING_TOKENS[0] - 512)
    per_sigma, layer_errors = [], []
    for sigma in sigmas:
        inputs["timestep"] = torch.full_like(inputs["timestep"], sigma)
        errors, output_error = _screen_one(transformer, choice, bf16, fp8, inputs)
        layer_errors.append(errors)
        ranked = sorted(errors)
        per_sigma.append(
            {
                "sigma": sigma,
                "layer_error_max": ranked[-1],
                "layer_error_median": ranked[len(ranked) // 2],
                "output_error": output_error,
            }
        )
    return summarize(list(sigmas), layer_errors, per_sigma)


def _screen_one(transformer, choice, bf16, fp8, inputs) -> tuple[list[float], float]:
    errors = []

    def both(q, k, v, attn):
        reference = bf16(q, k, v)
        got = fp8(q, k, v, attn).to(reference.dtype)
        errors.append(float((got.float() - reference.float()).norm() / reference.float().norm()))
        return reference

    both.takes_module = True
    choice.kernels["screen"] = both
    try:
        with choice.use("screen"):
            reference = transformer(**inputs)[0].float()
    finally:
        del choice.kernels["screen"]
    with choice.use(FA3_FP8):
        output = transformer(**inputs)[0].float()
    return errors, float((output - reference).norm() / reference.norm())


def summarize(sigmas: list[float], layer_errors: list[list[float]], per_sigma: list[dict]) -> dict:
    """The screen's report: overall figures (as the one-sigma screen had), per sigma, per layer, the worst pairs."""
    pairs = sorted(
        (
            (error, layer, sigma)
            for sigma, errors in zip(sigmas, layer_errors, strict=True)
            for layer, error in enumerate(errors)
        ),
        reverse=True,
    )
    flat = sorted(error for error, _, _ in pairs)
    layers = len(layer_errors[0])
    return {
        "layers": layers,
        "sigmas": sigmas,
        "layer_error_max": flat[-1],
        "layer_error_median": flat[len(flat) // 2],
        "output_error": max(entry["output_error"] for entry in per_sigma),
        "per_sigma": per_sigma,
        "per_layer_max": [max(errors[layer] for errors in layer_errors) for layer in range(layers)],
        "layer_errors": layer_errors,  # [sigma][layer]
        "worst": [{"layer": layer, "sigma": sigma, "error": error} for error, layer, sigma in pairs[:WORST]],
    }
