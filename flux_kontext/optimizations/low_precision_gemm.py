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


def quantizable(module: torch.nn.Module, name: str) -> bool:
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
def _reference_outputs(transformer: torch.nn.Module, prefix: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    outputs = {}
    for local, module in transformer.named_modules():
        name = f"{prefix}.{local}" if prefix and local else prefix or local
        if quantizable(module, name):
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


def _named_modules(root: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Module]:
    return {(f"{prefix}.{n}" if prefix and n else prefix or n): m for n, m in root.named_modules()}


@torch.inference_mode()
def _layer_errors(transformer: torch.nn.Module, references: dict, prefix: str = "") -> dict[str, float]:
    modules = _named_modules(transformer, prefix)
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

    def at_load(self, hardware: Hardware):
        """Quantize each transformer block as the loader moves it to the GPU (the memory plan's path: the bf16
        transformer never sits whole there); ``apply`` then reports what was done at load. None when torchao is
        missing (``apply`` says so)."""
        fmt, why = choose_format(self.settings.low_precision_gemm, hardware.capability)
        try:
            config = _config(fmt)
            from torchao.quantization import quantize_
        except ImportError:
            return None
        self._at_load = {"fmt": fmt, "why": why, "errors": {}, "kept_bf16": {}}

        def quantize_block(block: torch.nn.Module, prefix: str) -> None:
            errors, kept = self._quantize(block, prefix, fmt, config, quantize_)
            self._at_load["errors"].update(errors)
            self._at_load["kept_bf16"].update(kept)

        return quantize_block

    def _quantize(self, root, prefix, fmt, config, quantize_) -> tuple[dict[str, float], dict[str, float]]:
        """Screen, quantize and measure the quantizable layers under ``root`` (named from ``prefix``). A restart on
        the same key reads the screen's choice and the measured errors back (startup_decisions.py)."""
        modules = _named_modules(root, prefix)
        names = {name for name, module in modules.items() if quantizable(module, name)}

        def measure() -> dict:
            references = _reference_outputs(root, prefix)
            max_error = self.settings.fp8_max_layer_error
            selected, kept_bf16 = (
                select_fp8_layers(references, modules, max_error) if fmt == "fp8" else (set(references), {})
            )
            self._quantize_selected(root, modules, selected, config, quantize_)
            errors = _layer_errors(root, {name: references[name] for name in selected}, prefix)
            return {"selected": sorted(selected), "kept_bf16": kept_bf16, "errors": errors}

        value, cached = self.decisions.cached_or_measured(
            self.name, measure, prefix, valid=lambda kept: set(kept["selected"]) | set(kept["kept_bf16"]) == names
        )
        if cached is not None:  # read back: quantize the layers it chose
            self._quantize_selected(root, modules, set(value["selected"]), config, quantize_)
        return value["errors"], value["kept_bf16"]

    @staticmethod
    def _quantize_selected(root, modules: dict, selected: set[str], config, quantize_) -> None:
        if selected:
            full = {id(m): n for n, m in modules.items()}
            quantize_(root, config, filter_fn=lambda module, _name: full.get(id(module)) in selected)

    def apply(self, model: Model) -> Outcome:
        loaded = getattr(self, "_at_load", None)
        if loaded is not None:
            return self._outcome(loaded["fmt"], loaded["why"], loaded["errors"], loaded["kept_bf16"], at_load=True)
        fmt, why = choose_format(self.settings.low_precision_gemm, model.hardware.capability)
        try:
            config = _config(fmt)
            from torchao.quantization import quantize_
        except ImportError as exc:
            return Outcome("unavailable", f"{why}: torchao not importable ({exc}); pip install torchao==0.18.0")
        errors, kept_bf16 = self._quantize(model.pipe.transformer, "", fmt, config, quantize_)
        return self._outcome(fmt, why, errors, kept_bf16, at_load=False)

    def _outcome(self, fmt, why, errors, kept_bf16, at_load: bool) -> Outcome:
        max_error = self.settings.fp8_max_layer_error
        if not errors:
            return Outcome.skipped(f"{why}; every layer's simulated FP8 error is above {max_error}: all bf16")
        median = sorted(errors.values())[len(errors) // 2]
        worst = max(errors, key=errors.get)
        screened = (
            f"{len(kept_bf16)} more kept bf16 (simulated FP8 error above {max_error})"
            if fmt == "fp8"
            else "no per-layer screening for MXFP4"
        )
        where = "applied at load, block by block on the way to the GPU (memory plan); " if at_load else ""
        detail = (
            f"{where}{why}; {len(errors)} linear layers quantized; {', '.join(KEEP_BF16)} kept bf16, {screened}; "
            f"output relative error median {median:.2e}, max {errors[worst]:.2e} ({worst}) on random activations"
        )
        detail += self.decisions.note(self.name)
        return Outcome.applied(
            detail,
            format=fmt,
            kept_bf16=kept_bf16,
            at_load=at_load,
            decisions=self.decisions.describe(self.name),
            _layer_errors=errors,
        )
