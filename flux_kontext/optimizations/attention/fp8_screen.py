"""The start-up screen that decides whether FA3 in FP8 may serve the loaded weights (FLUX_FP8_ATTENTION=auto)."""

from __future__ import annotations

import torch

from flux_kontext.optimizations.attention.kernels import FA3_FP8, KernelChoice
from flux_kontext.optimizations.attention.selection import TIMING_TOKENS


@torch.inference_mode()
def screen_fp8_attention(transformer, choice: KernelChoice) -> dict:
    """FA3 in FP8 against the active bf16 kernel on the loaded weights, one 1024² text-to-image step (eager): the
    relative error of every layer's attention output (both kernels on the same q, k, v, as the model produces them;
    q and k with the static scales serving uses) and of the transformer's output. The per-layer errors decide: on
    random weights the output barely depends on attention (zeroing it moves the tiny model's output by 2%), so the
    output error alone would prove nothing."""
    from flux_kontext.models import step_inputs

    bf16, fp8, layer_errors = choice.kernels[choice.active], choice.kernels[FA3_FP8], []

    def both(q, k, v, attn):
        reference = bf16(q, k, v)
        got = fp8(q, k, v, attn).to(reference.dtype)
        layer_errors.append(float((got.float() - reference.float()).norm() / reference.float().norm()))
        return reference

    both.takes_module = True

    parameter = next(transformer.parameters())
    inputs = step_inputs(transformer.config, parameter.device, parameter.dtype, TIMING_TOKENS[0] - 512)
    choice.kernels["screen"] = both
    try:
        with choice.use("screen"):
            reference = transformer(**inputs)[0].float()
    finally:
        del choice.kernels["screen"]
    with choice.use(FA3_FP8):
        output = transformer(**inputs)[0].float()
    ranked = sorted(layer_errors)
    return {
        "layer_error_max": ranked[-1],
        "layer_error_median": ranked[len(ranked) // 2],
        "layers": len(ranked),
        "output_error": float((output - reference).norm() / reference.norm()),
    }
