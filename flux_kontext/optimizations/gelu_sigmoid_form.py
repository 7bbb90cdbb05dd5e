"""gelu_sigmoid_form: tanh-GELU written in its sigmoid form, the same function, fewer instructions in compiled code.

0.5·x·(1 + tanh(z)) = x·σ(2z) with z = √(2/π)·(x + 0.044715·x³). Inductor lowers tanh to libdevice's tanhf and σ
to an exp2 and a reciprocal. In the FP8 blocks the MLP's GELU is fused into the kernel that finds each row's absmax
and quantizes the row for the next GEMM; that kernel passes over the row twice and evaluates the GELU in both
passes, and the profile (bench/cuda_graph_probe.py) shows it among the slowest glue kernels. Only for compiled
code: eager PyTorch has its own fused GELU kernel, so without compile nothing is changed. Before compile, which
fuses it.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.activations import GELU as DiffusersGELU

from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, skip

_TWO_SQRT_2_OVER_PI = 2.0 * math.sqrt(2.0 / math.pi)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(approximate="tanh") as x·σ(2z), computed in fp32 like PyTorch's own kernel."""
    xf = x.float()
    return (xf * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class SigmoidFormGELU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh_gelu(x)


def replace_tanh_gelus(transformer: torch.nn.Module) -> int:
    """Swap every tanh-GELU of the transformer blocks for the sigmoid form; returns how many."""
    count = 0
    for block in transformer.single_transformer_blocks:
        if isinstance(block.act_mlp, torch.nn.GELU) and block.act_mlp.approximate == "tanh":
            block.act_mlp = SigmoidFormGELU()
            count += 1
    for block in transformer.transformer_blocks:
        for feed_forward in (block.ff, block.ff_context):
            projection = feed_forward.net[0]
            replaced = projection.__dict__.get("gelu") is tanh_gelu
            if isinstance(projection, DiffusersGELU) and projection.approximate == "tanh" and not replaced:
                projection.gelu = tanh_gelu  # instance attribute: replaces the class's gelu() for this module
                count += 1
    return count


class GeluSigmoidForm(Optimization):
    name = "gelu_sigmoid_form"

    def decide(self, hardware: Hardware) -> Decision:
        if not hardware.is_cuda or not self.settings.compile:
            return skip("only pays inside compiled code (GPU with FLUX_COMPILE=true)")
        if not self.settings.gelu_sigmoid_form:
            return skip("FLUX_GELU_SIGMOID_FORM=false")
        return APPLY

    def apply(self, model: Model) -> Outcome:
        count = replace_tanh_gelus(model.pipe.transformer)
        return Outcome.applied(
            f"{count} tanh-GELUs computed as x·sigmoid(2z), the same function (fp32 inside); cheaper where compile "
            "fuses them into the FP8 row quantization",
            replaced=count,
        )
