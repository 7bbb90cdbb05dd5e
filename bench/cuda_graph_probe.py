"""CUDA graphs on the full-size transformer: what the service ships, checked and timed, plus where a step's time goes.

Builds the full-size random transformer with the service's own steps (fused QKV, cuDNN attention processor, FP8,
regional compile, then cuda_graphs.install: one graph per block and shape) and, for a 1024² text-to-image and a
1024² edit:
- times a forward compiled (graphs off), with the shipped per-block graphs, and as one whole-model graph
  (the upper bound of what graphs can buy; it cannot hold the first-block cache's decision);
- checks the outputs: graphs against compiled (bit-identical expected), compiled against eager;
- runs one call sequence with the first-block cache on top (repeated inputs, so it skips) with graphs on and
  off: the same outputs and the same skip counts expected;
- profiles one compiled text-to-image forward: CUDA time by kernel family (GEMM, attention, Triton glue, other);
- rewrites the tanh-GELUs in their sigmoid form (activation.py), recompiles, and times and profiles again; then
  checks the one-pass GELU + FP8 Triton kernel (fused_kernels.py) against its reference, routes the MLP outputs
  through it, and times again; then the same with Inductor's multi-kernel on.

    python bench/cuda_graph_probe.py --out bench/results/cuda-graphs-h100.json
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.correctness import DEVICE, full_random_transformer, inputs, output_path_from_args, rel  # noqa: E402
from flux_kontext.optimizations import (  # noqa: E402
    OptimizationContext,
    activation,
    attention,
    cuda_graphs,
    fused_fp8,
    fused_kernels,
    layout,
    quantization,
)
from flux_kontext.optimizations import compile as compile_step  # noqa: E402
from flux_kontext.optimizations.caching import FirstBlockCache  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402

log = logging.getLogger("bench.cuda_graph_probe")


def time_ms(fn, repeats: int = 10) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def whole_model_graph_ms(model, kwargs) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(**kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**kwargs)
    ms = time_ms(graph.replay)
    del graph
    return ms


def kernel_family(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("triton"):  # Inductor's fused kernels name the ops they fuse (scaled_mm, sdpa...)
        return "triton_glue"
    if any(k in lowered for k in ("flash", "fmha", "cudnn", "attention", "sdpa")):  # before "cutlass": FA3 is one
        return "attention"
    if any(k in lowered for k in ("gemm", "cutlass", "nvjet", "xmma", "scaled_mm", "f8f8")):
        return "gemm"
    if any(k in lowered for k in ("gelu_fp8", "ln_mod_fp8", "qk_norm_rope", "v_fp8")):
        return "our_kernels"  # fused_kernels.py
    return "other"


def profile_forward(model, kwargs) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**kwargs)
        torch.cuda.synchronize()
    families, kernels = defaultdict(float), []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if us <= 0 or event.key.startswith("ProfilerStep"):
            continue
        families[kernel_family(event.key)] += us / 1000.0
        kernels.append((us / 1000.0, event.count, event.key[:160]))
    kernels.sort(reverse=True)
    return {
        "ms_by_family": {k: round(v, 2) for k, v in sorted(families.items())},
        "top_kernels": [{"ms": round(ms, 3), "calls": n, "name": name} for ms, n, name in kernels[:30]],
    }


def check_fused_kernel() -> dict:
    """The Triton GELU + FP8 kernel against its PyTorch reference on random rows of the single block's widths."""
    g = torch.Generator(device="cpu").manual_seed(3)
    attn = torch.randn(4608, 3072, generator=g).to(DEVICE, torch.bfloat16)
    mlp = (torch.randn(4608, 12288, generator=g) * 3).to(DEVICE, torch.bfloat16)
    fused_kernels.build_ops()
    values, scale = fused_kernels.gelu_fp8(attn, mlp)
    ref_values, ref_scale = fused_kernels.reference_gelu_fp8(attn, mlp)
    return {
        "scale_max_rel_diff": float(((scale - ref_scale).abs() / ref_scale).max()),
        "values_differing_fraction": float((values.float() != ref_values.float()).float().mean()),
        "dequantized_rel_error": rel(values.float() * scale, ref_values.float() * ref_scale),
        "kernel_ms": time_ms(lambda: fused_kernels.gelu_fp8(attn, mlp), repeats=50),
        "bytes_floor_ms_at_3_tb_s": round((attn.numel() * 2 + mlp.numel() * 3) / 3e12 * 1000, 4),
    }


def reroute_through_fused_kernel(model) -> dict:
    """fused_fp8.replace() on a model already compiled and graphed: keep the wrappers, swap what they wrap."""
    wrappers = [block.forward for block in model.single_transformer_blocks]  # GraphedBlock(CompiledForward(...))
    count = fused_fp8.replace(model)
    for block, graphed in zip(model.single_transformer_blocks, wrappers, strict=True):
        graphed.forward = compile_step.CompiledForward(block.forward)
        block.forward = graphed
    manager = wrappers[0].manager
    manager.clear()  # graphs hold the old kernels
    return count


def recompile_and_time(model, cases: dict, eager: dict, result: dict, label: str) -> None:
    """Drop the compiled code, recompile each case, and record its time, error and gain over the first compile."""
    torch._dynamo.reset()
    for case, kwargs in cases.items():
        row = result["cases"][case]
        for _ in range(3):
            model(**kwargs)
        out = model(**kwargs)[0].float()
        row[f"{label}_compiled_ms"] = time_ms(lambda kw=kwargs: model(**kw))
        row[f"{label}_vs_eager_rel_error"] = rel(out, eager[case])
        row[f"{label}_gain"] = round(row["compiled_ms"] / row[f"{label}_compiled_ms"], 4)
        log.info("%s %s: %s", case, label, {k: v for k, v in row.items() if k.startswith(label)})
    result[f"profile_text_to_image_{label}"] = profile_forward(model, cases["text_to_image"])
    log.info("profile (%s): %s", label, result[f"profile_text_to_image_{label}"]["ms_by_family"])


@torch.inference_mode()
def main() -> int:
    out = output_path_from_args()
    model = full_random_transformer()
    pipe = SimpleNamespace(transformer=model, vae=None)
    # Multi-kernel off at first: it is measured as its own step below.
    settings = Settings(quantize="auto", compile_multi_kernel=False)
    context = OptimizationContext("cuda", torch.cuda.get_device_capability(), settings)
    layout.apply_fuse_qkv(pipe, context)
    model.set_attn_processor(
        attention.KernelFluxAttnProcessor(attention.KernelChoice(kernels={"cudnn": attention._cudnn}, active="cudnn"))
    )
    fp8 = quantization.apply(pipe, context)
    cases = {"text_to_image": inputs(4096, 0), "edit": inputs(4096, 4096)}
    eager = {case: model(**kwargs)[0].float() for case, kwargs in cases.items()}
    compile_step.apply(pipe, context)
    manager = cuda_graphs.install(model, cuda_graphs.CudaGraphBackend(), max_shapes=4)
    result = {
        "fp8": fp8.status,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cases": {},
    }
    for case, kwargs in cases.items():
        row = result["cases"][case] = {}
        manager.enabled = False
        for _ in range(3):
            model(**kwargs)  # compile this shape
        compiled = model(**kwargs)[0].float()
        row["compiled_ms"] = time_ms(lambda kw=kwargs: model(**kw))
        row["compiled_vs_eager_rel_error"] = rel(compiled, eager[case])
        manager.enabled = True
        model(**kwargs)  # first sight: runs uncaptured
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(**kwargs)  # captures the 57 block graphs
        torch.cuda.synchronize()
        row["capture_seconds"] = round(time.perf_counter() - start, 2)
        graphed = model(**kwargs)[0].float()
        row["per_block_graphs_ms"] = time_ms(lambda kw=kwargs: model(**kw))
        row["per_block_graphs_vs_compiled_rel_error"] = rel(graphed, compiled)
        row["counts"] = manager.reset_counts()
        row["gain_per_block"] = round(row["compiled_ms"] / row["per_block_graphs_ms"], 4)
        manager.enabled = False
        try:
            row["whole_model_graph_ms"] = whole_model_graph_ms(model, kwargs)
            row["gain_whole_model"] = round(row["compiled_ms"] / row["whole_model_graph_ms"], 4)
        except Exception as exc:
            row["whole_model_graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        log.info("%s: %s", case, row)
        out.write_text(json.dumps(result, indent=2) + "\n")

    manager.enabled = False
    result["profile_text_to_image_compiled"] = profile_forward(model, cases["text_to_image"])
    log.info("profile: %s", result["profile_text_to_image_compiled"]["ms_by_family"])

    # tanh-GELU in its sigmoid form (activation.py), then Inductor's multi-kernel (persistent reductions up to
    # 16k-wide rows, the faster variant picked by timing): recompile, time and check each (graphs off).
    result["gelu_sigmoid_form_replaced"] = activation.replace_tanh_gelus(model)
    recompile_and_time(model, cases, eager, result, "gelu_sigmoid_form")
    result["fused_gelu_fp8_kernel"] = check_fused_kernel()
    log.info("fused kernel: %s", result["fused_gelu_fp8_kernel"])
    result["fused_gelu_fp8_replaced"] = reroute_through_fused_kernel(model)
    recompile_and_time(model, cases, eager, result, "gelu_sigmoid_form+fused_gelu_fp8")
    out.write_text(json.dumps(result, indent=2) + "\n")
    torch._inductor.config.triton.multi_kernel = 1
    recompile_and_time(model, cases, eager, result, "gelu_sigmoid_form+fused_gelu_fp8+multi_kernel")
    out.write_text(json.dumps(result, indent=2) + "\n")

    # The cache on top: the same call sequence with graphs on and off must give the same outputs and skips.
    # Graphs are recaptured first: they must hold the compiled code that runs when they are off (after the
    # recompile above, and because dynamo serves a second shape from a dynamic-shape variant whose FP8 rounding
    # differs from the static one the first graphs were captured from).
    manager.clear()
    cache = FirstBlockCache(model, threshold=0.12)
    a, b = cases["text_to_image"], inputs(4096, 0)
    b["hidden_states"] = b["hidden_states"] * 0.5
    sequence = [a, a, b, b, a]
    runs = {}
    for enabled in (False, True):
        manager.enabled = enabled
        with cache.request(None, None):
            outputs = [model(**kwargs)[0].float() for kwargs in sequence]
            runs[enabled] = (outputs, cache.summary())
    result["first_block_cache_with_graphs"] = {
        "sequence": "a, a, b, b, a (repeats have zero residual change)",
        "counts_graphs_off": runs[False][1],
        "counts_graphs_on": runs[True][1],
        "graphs_failure": manager.failure,
        "graph_counts": manager.reset_counts(),
        "rel_error_on_vs_off_per_call": [rel(x, y) for x, y in zip(runs[True][0], runs[False][0], strict=True)],
    }
    log.info("cache with graphs: %s", result["first_block_cache_with_graphs"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
