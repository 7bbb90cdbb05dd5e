"""Probe for the CUDA-graph stage: can the compiled FP8 transformer be captured whole, and what does it buy?

Builds the full-size random transformer with the service's own steps (fused QKV, cuDNN attention processor,
FP8, regional compile, first-block cache off), times a 1024² text-to-image forward normally and as one
replayed CUDA graph, and checks the replay computes the same output.

    python bench/cuda_graph_probe.py --out bench/results/cuda-graph-probe-h100.json
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.correctness import full_random_transformer, inputs, output_path_from_args, rel  # noqa: E402
from flux_kontext.optimizations import OptimizationContext, attention, layout, quantization  # noqa: E402
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


@torch.inference_mode()
def main() -> int:
    out = output_path_from_args()
    model = full_random_transformer()
    pipe = SimpleNamespace(transformer=model, vae=None)
    context = OptimizationContext("cuda", torch.cuda.get_device_capability(), Settings(quantize="auto"))
    layout.apply_fuse_qkv(pipe, context)
    model.set_attn_processor(
        attention.KernelFluxAttnProcessor(attention.KernelChoice(kernels={"cudnn": attention._cudnn}, active="cudnn"))
    )
    fp8 = quantization.apply(pipe, context)
    model.compile_repeated_blocks(fullgraph=True)
    kwargs = inputs(4096, 0)
    for _ in range(3):
        model(**kwargs)
    torch.cuda.synchronize()
    reference = model(**kwargs)[0].float()
    result = {"fp8": fp8.status, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["compiled_ms"] = time_ms(lambda: model(**kwargs))
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(**kwargs)  # warm on the side stream, as capture requires
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            static_out = model(**kwargs)[0]
        graph.replay()
        torch.cuda.synchronize()
        result["graph_vs_compiled_rel_error"] = rel(static_out.float(), reference)
        result["graph_ms"] = time_ms(graph.replay)
        result["gain"] = round(result["compiled_ms"] / result["graph_ms"], 4)
    except Exception as exc:  # the probe's point is to learn whether capture works
        result["capture_error"] = f"{type(exc).__name__}: {exc}"[:2000]
    log.info("%s", result)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
