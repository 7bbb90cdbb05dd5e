"""Does each optimization compute the same function? Full-size random transformer, fixed inputs, on a GPU.

Reference: the eager bf16 transformer with diffusers' own attention processor. Each variant's output is
compared by ||out - ref|| / ||ref|| (fp32): our processor per kernel, fused QKV, regional compile, and FP8
(end to end, plus the per-layer errors that quantization.apply measures). Also times one forward each.

    python bench/correctness.py --out bench/results/correctness-h100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402

from flux_kontext.logging_setup import configure_logging  # noqa: E402
from flux_kontext.models import FULL_TRANSFORMER, step_inputs  # noqa: E402
from flux_kontext.optimizations import OptimizationContext, activation, attention, layout, quantization  # noqa: E402
from flux_kontext.optimizations import compile as compile_step  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402

log = logging.getLogger("bench.correctness")
DEVICE = torch.device("cuda")


def inputs(image_tokens: int, context_tokens: int) -> dict:
    """Transformer inputs of a 1024² step: 512 text tokens, image tokens (+ context tokens for an edit)."""
    config = SimpleNamespace(in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    return step_inputs(config, DEVICE, torch.bfloat16, image_tokens, context_tokens)


@torch.inference_mode()
def forward(model, kwargs) -> tuple[torch.Tensor, float]:
    model(**kwargs)  # warm (or compile)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(**kwargs)[0]
    torch.cuda.synchronize()
    return out.float(), (time.perf_counter() - start) * 1000.0


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def full_random_transformer() -> FluxTransformer2DModel:
    """The full-size FLUX transformer, random weights (seed 0), bf16, built on the GPU."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return FluxTransformer2DModel(**FULL_TRANSFORMER).to(torch.bfloat16).eval()


def output_path_from_args() -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    path = parser.parse_args().out
    configure_logging()
    return path


def main() -> int:
    out = output_path_from_args()
    reference_model = full_random_transformer()
    cases = {"text_to_image": inputs(4096, 0), "edit": inputs(4096, 4096)}
    results = {"cases": {}, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}
    refs = {}
    for case, kwargs in cases.items():
        refs[case], ms = forward(reference_model, kwargs)
        finite = bool(torch.isfinite(refs[case]).all())
        results["cases"][case] = {"reference_ms": round(ms, 1), "reference_finite": finite, "variants": {}}
    fp8_model = copy.deepcopy(reference_model)

    def record(name: str, model) -> None:
        for case, kwargs in cases.items():
            out, ms = forward(model, kwargs)
            results["cases"][case]["variants"][name] = {"relative_error": rel(out, refs[case]), "ms": round(ms, 1)}
            log.info("%-28s %-13s rel err %.2e  %.1f ms", name, case, rel(out, refs[case]), ms)

    usable, measured, rejected = attention.measure_kernels("auto", DEVICE)
    results["kernels"] = {"measured": measured, "rejected": rejected}
    choice = attention.KernelChoice(kernels=usable)
    reference_model.set_attn_processor(attention.KernelFluxAttnProcessor(choice))
    for name in usable:
        choice.active = name
        record(f"processor[{name}]", reference_model)
    choice.active = min(measured, key=lambda n: sum(v for k, v in measured[n].items() if k.startswith("ms_")))
    context = _cuda_context()
    layout.apply_fuse_qkv(SimpleNamespace(transformer=reference_model, vae=None), context)
    record(f"fused_qkv[{choice.active}]", reference_model)
    compile_step.apply(SimpleNamespace(transformer=reference_model, vae=None), context)
    record(f"compiled+fused[{choice.active}]", reference_model)

    layout.apply_fuse_qkv(SimpleNamespace(transformer=fp8_model, vae=None), context)
    fp8_model.set_attn_processor(attention.KernelFluxAttnProcessor(choice))
    report = quantization.apply(SimpleNamespace(transformer=fp8_model), context)
    errors = report.data.get("_layer_errors", {})
    results["fp8"] = {"status": report.status, "detail": report.detail, "layer_errors": errors}
    log.info("fp8: %s", report.detail)
    if report.status == "applied":
        record(f"fp8+fused[{choice.active}]", fp8_model)
        activation.replace_tanh_gelus(fp8_model)  # what the service compiles: the GELU in sigmoid form
        compile_step.apply(SimpleNamespace(transformer=fp8_model, vae=None), context)
        record(f"fp8+gelu_form+compiled+fused[{choice.active}]", fp8_model)
    del reference_model, fp8_model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    results["against_fp32"] = compile_against_fp32(cases["text_to_image"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _cuda_context() -> OptimizationContext:
    return OptimizationContext("cuda", torch.cuda.get_device_capability(), Settings(quantize="auto"))


def compile_against_fp32(kwargs: dict) -> dict:
    """Is compile's deviation from eager bf16 just bf16 rounding? Compare both with an fp32 model.

    The full 12B model in fp32 (48 GB) does not fit beside the rest, so this uses the first 4 double and 8 single
    blocks at full width, the same random weights in fp32 and bf16.
    """
    torch.manual_seed(0)
    config = {**FULL_TRANSFORMER, "num_layers": 4, "num_single_layers": 8}
    with torch.device(DEVICE):
        fp32_model = FluxTransformer2DModel(**config).eval()
    bf16_model = copy.deepcopy(fp32_model).to(torch.bfloat16)
    fp32_kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    torch.set_float32_matmul_precision("highest")  # true fp32 GEMMs, no TF32, for the reference
    reference, _ = forward(fp32_model, fp32_kwargs)
    eager, _ = forward(bf16_model, kwargs)
    compile_step.apply(SimpleNamespace(transformer=bf16_model, vae=None), _cuda_context())
    compiled, _ = forward(bf16_model, kwargs)
    result = {
        "blocks": "4 double + 8 single, full width",
        "eager_bf16_vs_fp32": rel(eager, reference),
        "compiled_bf16_vs_fp32": rel(compiled, reference),
        "compiled_vs_eager_bf16": rel(compiled, eager),
    }
    log.info("against fp32: %s", result)
    return result


if __name__ == "__main__":
    sys.exit(main())
