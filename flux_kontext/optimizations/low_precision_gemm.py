"""low_precision_gemm: low-precision GEMMs for the transformer, the best format whose tensor cores this GPU really has.

- sm_100+ (Blackwell): MXFP4 (torchao MX, 32-element blocks), real FP4 tensor cores.
- sm_89 / sm_90 (Ada, Hopper): FP8 e4m3 rowwise (torchao), dynamic activation scales. MX formats only emulate
  here (slower than bf16), so the seed's `use_mxfp4` gets FP8 on Hopper and says so.
- elsewhere: bf16.
The embedders and the output projection stay bf16 (first and last layers, a few % of the FLOPs, the most
sensitive). Before quantizing, each layer's FP8 error is simulated (rowwise e4m3 quantize-dequantize of the
weight and of random activations); a layer above FLUX_FP8_MAX_LAYER_ERROR stays bf16 (e4m3 spans about
2^-9..448, so a row whose largest entry is ~1e5x its typical one pushes the rest into subnormals). After
quantizing, each layer's real output error is measured and reported. Random activations have no outlier
channels; real ones may, so real-weight errors can be higher than what is measured here.
Weights are quantized at load: a request cannot switch this off (its response says so). After fuse_qkv (the fused
weight is what gets quantized), before the fused FP8 blocks (which read the FP8 weights) and compile (which traces
them). Setting: FLUX_LOW_PRECISION_GEMM (alias FLUX_QUANTIZE); request flag: the seed's use_mxfp4.
"""

from __future__ import annotations

import logging

import torch

from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8
from flux_kontext.stack import APPLY, Decision, Hardware, Model, Optimization, Outcome, skip, unavailable

log = logging.getLogger(__name__)

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


def _fp8_rowwise(t: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize each row to float8 e4m3 with its own scale (what rowwise FP8 GEMMs do)."""
    values, scale = quantize_rowwise_fp8(t)
    return values.float() * scale


@torch.inference_mode()
def simulated_fp8_error(layer: torch.nn.Linear, x: torch.Tensor) -> float:
    """Relative output error of ``layer`` under rowwise FP8 of weight and activations (fp32 accumulation)."""
    reference = torch.nn.functional.linear(x.float(), layer.weight.float())
    quantized = torch.nn.functional.linear(_fp8_rowwise(x), _fp8_rowwise(layer.weight))
    return float((quantized - reference).norm() / reference.norm().clamp(min=1e-12))


@torch.inference_mode()
def _reference_outputs(transformer: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    outputs = {}
    for name, module in transformer.named_modules():
        if _quantizable(module, name):
            x = torch.randn(ERROR_ROWS, module.in_features, generator=generator).to(module.weight)
            outputs[name] = (x, module(x))
    return outputs


def select_fp8_layers(references: dict, modules: dict, max_error: float) -> tuple[set[str], dict[str, float]]:
    """Names whose simulated FP8 error is within ``max_error``, and the simulated error of those kept bf16."""
    kept_bf16 = {}
    for name, (x, _) in references.items():
        error = simulated_fp8_error(modules[name], x)
        if not error <= max_error:
            kept_bf16[name] = error
    return set(references) - set(kept_bf16), kept_bf16


@torch.inference_mode()
def _layer_errors(transformer: torch.nn.Module, references: dict) -> dict[str, float]:
    modules = dict(transformer.named_modules())
    errors = {}
    for name, (x, expected) in references.items():
        got = modules[name](x).float()
        errors[name] = float((got - expected.float()).norm() / expected.float().norm())
    return errors


class LowPrecisionGemm(Optimization):
    name = "low_precision_gemm"
    flag = "use_mxfp4"
    after = ("fuse_qkv",)

    def decide(self, hardware: Hardware) -> Decision:
        fmt, why = choose_format(self.settings.low_precision_gemm, hardware.capability)
        if fmt is None:
            return skip(why) if self.settings.low_precision_gemm == "none" else unavailable(why)
        return APPLY

    def apply(self, model: Model) -> Outcome:
        fmt, why = choose_format(self.settings.low_precision_gemm, model.hardware.capability)
        try:
            config = _config(fmt)
            from torchao.quantization import quantize_
        except ImportError as exc:
            return Outcome("unavailable", f"{why}: torchao not importable ({exc}); pip install torchao==0.18.0")
        transformer = model.pipe.transformer
        references = _reference_outputs(transformer)
        modules = dict(transformer.named_modules())
        max_error = self.settings.fp8_max_layer_error
        selected, kept_bf16 = (
            select_fp8_layers(references, modules, max_error) if fmt == "fp8" else (set(references), {})
        )
        if not selected:
            return Outcome.skipped(f"{why}; every layer's simulated FP8 error is above {max_error}: all bf16")
        quantize_(transformer, config, filter_fn=lambda module, name: name in selected)
        errors = _layer_errors(transformer, {name: references[name] for name in selected})
        del references
        median = sorted(errors.values())[len(errors) // 2]
        worst = max(errors, key=errors.get)
        screened = (
            f"{len(kept_bf16)} more kept bf16 (simulated FP8 error above {max_error})"
            if fmt == "fp8"
            else "no per-layer screening for MXFP4"
        )
        detail = (
            f"{why}; {len(errors)} linear layers quantized; {', '.join(KEEP_BF16)} kept bf16, {screened}; output "
            f"relative error median {median:.2e}, max {errors[worst]:.2e} ({worst}) on random activations"
        )
        return Outcome.applied(detail, format=fmt, kept_bf16=kept_bf16, _layer_errors=errors)
