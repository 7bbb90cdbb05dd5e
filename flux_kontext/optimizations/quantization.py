"""Low-precision GEMMs for the transformer: the best format whose tensor cores this GPU really has.

- sm_100+ (Blackwell): MXFP4 (torchao MX, 32-element blocks), real FP4 tensor cores.
- sm_89 / sm_90 (Ada, Hopper): FP8 e4m3 rowwise (torchao), dynamic activation scales. MX formats only emulate
  here (slower than bf16), so the seed's `use_mxfp4` gets FP8 on Hopper and says so.
- elsewhere: bf16.
The embedders and the output projection stay bf16 (first and last layers, a few % of the FLOPs, the most
sensitive). Every quantized layer's output error on random activations is measured and reported.
Weights are quantized at load: a request cannot switch this off (its response says so).
"""

from __future__ import annotations

import logging

import torch

from flux_kontext.optimizations import OptimizationContext, Report

log = logging.getLogger(__name__)

NAME = "low_precision_gemm"
FLAG = "use_mxfp4"
KEEP_BF16 = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
ERROR_ROWS = 64  # activation rows per layer for the error measurement


def _quantizable(module: torch.nn.Module, name: str) -> bool:
    if not isinstance(module, torch.nn.Linear) or any(name.startswith(prefix) for prefix in KEEP_BF16):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def choose_format(setting: str, capability: tuple[int, int] | None) -> tuple[str | None, str]:
    """(format or None, why) for FLUX_QUANTIZE and this GPU's compute capability."""
    if capability is None:
        return None, "FP8/FP4 GEMMs need an NVIDIA GPU (sm_89+); this is a CPU: bf16/fp32"
    arch = f"sm_{capability[0]}{capability[1]}"
    if setting == "none":
        return None, "FLUX_QUANTIZE=none"
    if capability >= (10, 0) and setting in ("auto", "mxfp4"):
        return "mxfp4", f"MXFP4 on FP4 tensor cores ({arch})"
    if capability >= (8, 9):
        why = f"FP8 e4m3 rowwise ({arch})"
        if setting in ("auto", "mxfp4"):
            why += f"; MXFP4 needs FP4 tensor cores (sm_100+), this GPU is {arch}: it would only emulate, slower"
        return "fp8", why
    return None, f"FP8 needs sm_89+ and FP4 sm_100+; this GPU is {arch}: bf16"


def _config(fmt: str):
    if fmt == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        # set_inductor_config=False: True made the first compiled call take 346 s on H100 (10-16 s without), as fast.
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig

    return MXDynamicActivationMXWeightConfig(
        activation_dtype=torch.float4_e2m1fn_x2, weight_dtype=torch.float4_e2m1fn_x2, block_size=32
    )


@torch.inference_mode()
def _reference_outputs(transformer: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    outputs = {}
    for name, module in transformer.named_modules():
        if _quantizable(module, name):
            x = torch.randn(ERROR_ROWS, module.in_features, generator=generator).to(module.weight)
            outputs[name] = (x, module(x))
    return outputs


@torch.inference_mode()
def _layer_errors(transformer: torch.nn.Module, references: dict) -> dict[str, float]:
    modules = dict(transformer.named_modules())
    errors = {}
    for name, (x, expected) in references.items():
        got = modules[name](x).float()
        errors[name] = float((got - expected.float()).norm() / expected.float().norm())
    return errors


def apply(pipe, context: OptimizationContext) -> Report:
    fmt, why = choose_format(context.settings.quantize, context.capability)
    if fmt is None:
        status = "skipped" if context.settings.quantize == "none" else "unavailable"
        return Report(NAME, status, why, flag=FLAG)
    try:
        config = _config(fmt)
        from torchao.quantization import quantize_
    except ImportError as exc:
        return Report(
            NAME, "unavailable", f"{why}: torchao not importable ({exc}); pip install torchao==0.18.0", flag=FLAG
        )
    references = _reference_outputs(pipe.transformer)
    quantize_(pipe.transformer, config, filter_fn=_quantizable)
    errors = _layer_errors(pipe.transformer, references)
    del references
    ordered = sorted(errors.values())
    worst = max(errors, key=errors.get)
    detail = (
        f"{why}; {len(errors)} linear layers quantized, {', '.join(KEEP_BF16)} kept bf16; output relative error "
        f"median {ordered[len(ordered) // 2]:.2e}, max {errors[worst]:.2e} ({worst}) on random activations"
    )
    return Report(NAME, "applied", detail, flag=FLAG, data={"format": fmt, "_layer_errors": errors})
