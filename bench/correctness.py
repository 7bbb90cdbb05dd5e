"""Does each optimization compute the same function? Full-size random transformer, fixed inputs, on a GPU.

Reference: the eager bf16 transformer with diffusers' own attention processor. Each variant's output is
compared by ||out - ref|| / ||ref|| (fp32): our processor per kernel, fused QKV, regional compile, and FP8
(end to end, plus the per-layer errors that low_precision_gemm measures). The variants are cumulative and built
by the serving stack's own optimizations (``stack_for(settings, only=...)``), one subset at a time, so that each
row adds one thing; the kernel of the fused/compiled/FP8 rows is the fastest measured in this run. One forward of
each is timed too (not a benchmark: no repeats). Results: BENCHMARKS.md, "Correctness of each optimization".

    python bench/correctness.py --out bench/results/correctness-h100.json
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402

from bench.common import (  # noqa: E402
    DEVICE,
    apply_stack,
    full_random_transformer,
    header,
    output_and_ms,
    output_path_from_args,
    rel,
    step_cases,
    transformer_pipe,
    write_json,
)
from flux_kontext.models import FULL_TRANSFORMER  # noqa: E402
from flux_kontext.optimizations.attention.processor import install  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402

log = logging.getLogger("bench.correctness")


def settings() -> Settings:
    """Attention measured among the bf16 kernels only (FA3 in FP8 is a lower-precision tier, see fused_blocks.py);
    FP8 GEMMs where this GPU has them; compile without multi-kernel (the defaults otherwise)."""
    return Settings(attention="auto", fp8_attention="off", low_precision_gemm="auto", compile_multi_kernel=False)


@torch.inference_mode()
def forward(model, kwargs) -> tuple[torch.Tensor, float]:
    """One warm (or compiling) call, the output of the next, and one timed call."""
    return output_and_ms(model, kwargs, warmup=1, repeats=1)


def main() -> int:
    out = output_path_from_args(__doc__)
    reference_model = full_random_transformer()
    cases = step_cases()
    results = {"cases": {}, **header()}
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

    # Our processor on the unfused model, each kernel the attention optimization found usable, then the fastest.
    reference = transformer_pipe(reference_model)
    attention = apply_stack(reference, settings(), ["attention"])["attention"]
    measured = attention.selection.measured
    results["kernels"] = {"measured": measured, "rejected": attention.selection.rejected}
    choice = attention.choice
    for name in list(choice.kernels):
        choice.active = name
        record(f"processor[{name}]", reference_model)
    choice.active = min(measured, key=lambda n: sum(v for k, v in measured[n].items() if k.startswith("ms_")))
    apply_stack(reference, settings(), ["fuse_qkv"])
    record(f"fused_qkv[{choice.active}]", reference_model)
    apply_stack(reference, settings(), ["compile"])
    record(f"compiled+fused[{choice.active}]", reference_model)

    # FP8 on a copy of the weights, with the same processor and kernel.
    fp8 = transformer_pipe(fp8_model)
    report = apply_stack(fp8, settings(), ["fuse_qkv", "low_precision_gemm"])["low_precision_gemm"].report()
    install(fp8_model, choice)
    errors = report.data.get("_layer_errors", {})
    results["fp8"] = {"status": report.status, "detail": report.detail, "layer_errors": errors}
    log.info("fp8: %s", report.detail)
    if report.status == "applied":
        record(f"fp8+fused[{choice.active}]", fp8_model)
        apply_stack(fp8, settings(), ["gelu_sigmoid_form", "compile"])  # what the service compiles: the sigmoid form
        record(f"fp8+gelu_form+compiled+fused[{choice.active}]", fp8_model)
    del reference_model, fp8_model, reference, fp8
    gc.collect()  # compiled forwards and slots refer back to their modules: cycles
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    results["against_fp32"] = compile_against_fp32(cases["text_to_image"])
    write_json(out, results)
    return 0


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
    apply_stack(transformer_pipe(bf16_model), settings(), ["compile"])
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
