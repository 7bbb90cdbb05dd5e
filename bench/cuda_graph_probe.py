"""CUDA graphs on the full-size transformer: what the service ships, checked and timed, plus where a step's time goes.

Why: per-block graphs are only worth their memory if they buy time, and they must replay exactly what the compiled
blocks compute, under the first-block cache too. Results: BENCHMARKS.md, "CUDA graphs (stage 5), the GELU form, and
where a step's time goes".

Builds the full-size random transformer with the serving stack's own optimizations (fuse_qkv, attention on cuDNN,
low_precision_gemm, then compile and cuda_graphs: one graph per block and shape) and, for a 1024² text-to-image and a
1024² edit:
- times a forward compiled (graphs off), with the shipped per-block graphs, and as one whole-model graph
  (the upper bound of what graphs can buy; it cannot hold the first-block cache's decision);
- checks the outputs: graphs against compiled (bit-identical expected), compiled against eager;
- profiles one compiled text-to-image forward: CUDA time by kernel family (GEMM, attention, Triton glue, other);
- rewrites the tanh-GELUs in their sigmoid form (gelu_sigmoid_form), recompiles, and times and profiles again; then
  checks the one-pass GELU + FP8 Triton kernel (flux_kontext/optimizations/kernels) against its reference, routes the
  MLP outputs through it (fused_gelu_fp8 in the blocks' body slot, below compile and the graphs), and times again;
  then the same compiled with Inductor's multi-kernel on (FLUX_COMPILE_MULTI_KERNEL);
- runs one call sequence with the first-block cache on top (repeated inputs, so it skips) with graphs on and
  off: the same outputs and the same skip counts expected.

    python bench/cuda_graph_probe.py --out bench/results/cuda-graphs-h100.json
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    DEVICE,
    apply_stack,
    fp8_agreement,
    full_random_transformer,
    fused_counts,
    header,
    inputs,
    output_and_ms,
    output_path_from_args,
    profile_forward,
    rel,
    step_cases,
    time_ms,
    transformer_pipe,
    write_json,
)
from flux_kontext.optimizations import kernels  # noqa: E402
from flux_kontext.settings import Settings  # noqa: E402
from flux_kontext.stack import RequestRun, Stack  # noqa: E402

log = logging.getLogger("bench.cuda_graph_probe")
# cuDNN attention (no FA3, bf16), FP8 GEMMs, graphs for up to 4 shapes, the seed's cache threshold. Multi-kernel off
# at first: it is measured as its own step below.
SETTINGS = dict(
    attention="cudnn",
    fp8_attention="off",
    low_precision_gemm="auto",
    compile_multi_kernel=False,
    cuda_graph_max_shapes=4,
    cache_threshold=0.12,
)
GRAPHED = ["compile", "cuda_graphs"]


def whole_model_graph_ms(model, kwargs) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(**kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**kwargs)
    ms = time_ms(graph.replay, repeats=10, warmup=0)
    del graph
    return ms


def check_fused_kernel() -> dict:
    """The Triton GELU + FP8 kernel against its PyTorch reference on random rows of the single block's widths."""
    g = torch.Generator(device="cpu").manual_seed(3)
    attn = torch.randn(4608, 3072, generator=g).to(DEVICE, torch.bfloat16)
    mlp = (torch.randn(4608, 12288, generator=g) * 3).to(DEVICE, torch.bfloat16)
    kernels.ops()
    row = fp8_agreement(kernels.gelu_fp8(attn, mlp), kernels.reference_gelu_fp8(attn, mlp))
    row["kernel_ms"] = time_ms(lambda: kernels.gelu_fp8(attn, mlp), repeats=50, warmup=0)
    row["bytes_floor_ms_at_3_tb_s"] = round((attn.numel() * 2 + mlp.numel() * 3) / 3e12 * 1000, 4)
    return row


def on_top(graphs: Stack, pipe, settings: Settings, names: list[str]) -> Stack:
    """``names`` applied to the model under ``graphs`` (compile and cuda_graphs), in the same forward slots: a body
    (fused_gelu_fp8) or a compile with other options goes in below the graphs, and the slots above it are rebuilt.
    The graphs captured so far hold the old kernels: they are dropped, each shape is captured again."""
    stack = apply_stack(pipe, settings, names, slots=graphs.slots)
    graphs["cuda_graphs"].manager.clear()
    return stack


def recompile_and_time(model, cases: dict, eager: dict, result: dict, label: str) -> None:
    """Drop the compiled code, recompile each case, and record its time, error and gain over the first compile."""
    torch._dynamo.reset()
    for case, kwargs in cases.items():
        row = result["cases"][case]
        out, row[f"{label}_compiled_ms"] = output_and_ms(model, kwargs, warmup=3, repeats=10)
        row[f"{label}_vs_eager_rel_error"] = rel(out, eager[case])
        row[f"{label}_gain"] = round(row["compiled_ms"] / row[f"{label}_compiled_ms"], 4)
        log.info("%s %s: %s", case, label, {k: v for k, v in row.items() if k.startswith(label)})
    result[f"profile_text_to_image_{label}"] = profile_forward(model, cases["text_to_image"])
    log.info("profile (%s): %s", label, result[f"profile_text_to_image_{label}"]["ms_by_family"])


@torch.inference_mode()
def main() -> int:
    out = output_path_from_args(__doc__)
    model = full_random_transformer()
    pipe = transformer_pipe(model)
    settings = Settings(**SETTINGS)
    weights = apply_stack(pipe, settings, ["fuse_qkv", "attention", "low_precision_gemm"])
    cases = step_cases()
    eager = {case: model(**kwargs)[0].float() for case, kwargs in cases.items()}
    graphs = apply_stack(pipe, settings, GRAPHED)
    manager = graphs["cuda_graphs"].manager
    result = {"fp8": weights["low_precision_gemm"].status, **header(), "cases": {}}
    for case, kwargs in cases.items():
        row = result["cases"][case] = {}
        manager.enabled = False
        compiled, row["compiled_ms"] = output_and_ms(model, kwargs, warmup=3, repeats=10)  # compiles this shape
        row["compiled_vs_eager_rel_error"] = rel(compiled, eager[case])
        manager.enabled = True
        model(**kwargs)  # first sight: runs uncaptured
        capture_ms = time_ms(lambda kw=kwargs: model(**kw), repeats=1, warmup=0)  # captures the 57 block graphs
        row["capture_seconds"] = round(capture_ms / 1000, 2)
        graphed, row["per_block_graphs_ms"] = output_and_ms(model, kwargs, warmup=0, repeats=10)
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
        write_json(out, result)

    manager.enabled = False
    result["profile_text_to_image_compiled"] = profile_forward(model, cases["text_to_image"])
    log.info("profile: %s", result["profile_text_to_image_compiled"]["ms_by_family"])

    # tanh-GELU in its sigmoid form, then the fused GELU + FP8 kernel below compile, then Inductor's multi-kernel
    # (persistent reductions up to 16k-wide rows, the faster variant picked by timing): recompile, time and check
    # each (graphs off).
    gelu_form = apply_stack(pipe, settings, ["gelu_sigmoid_form"])
    result["gelu_sigmoid_form_replaced"] = gelu_form["gelu_sigmoid_form"].report().data.get("replaced")
    recompile_and_time(model, cases, eager, result, "gelu_sigmoid_form")
    result["fused_gelu_fp8_kernel"] = check_fused_kernel()
    log.info("fused kernel: %s", result["fused_gelu_fp8_kernel"])
    fused = on_top(graphs, pipe, settings, ["fused_gelu_fp8"])
    result["fused_gelu_fp8_replaced"] = fused_counts(fused)
    recompile_and_time(model, cases, eager, result, "gelu_sigmoid_form+fused_gelu_fp8")
    write_json(out, result)
    on_top(graphs, pipe, Settings(**{**SETTINGS, "compile_multi_kernel": True}), ["compile"])
    recompile_and_time(model, cases, eager, result, "gelu_sigmoid_form+fused_gelu_fp8+multi_kernel")
    write_json(out, result)

    # The cache on top: the same call sequence with graphs on and off must give the same outputs and skips.
    # Graphs are captured anew: they must hold the compiled code that runs when they are off (after the recompile
    # above, and because dynamo serves a second shape from a dynamic-shape variant whose FP8 rounding differs from
    # the static one the first graphs were captured from).
    manager.clear()
    cache = apply_stack(pipe, settings, ["first_block_cache"])["first_block_cache"].control
    a, b = cases["text_to_image"], inputs(4096, 0)
    b["hidden_states"] = b["hidden_states"] * 0.5
    sequence = [a, a, b, b, a]
    runs = {}
    for enabled in (False, True):
        manager.enabled = enabled
        with cache.request(None, RequestRun()):
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
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
