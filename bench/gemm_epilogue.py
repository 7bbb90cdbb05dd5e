"""Can the gated residual ride in the output GEMMs' epilogue? The Triton FP8 GEMM of
flux_kontext/optimizations/kernels/gemm_residual.py (TMA descriptors, wgmma through tl.dot, rowwise scales, bias, and
residual + gate·(x W^T + bias) in its epilogue, the residual read from two sources) against what the fused blocks ran:
cuBLAS's rowwise FP8 GEMM (``torch._scaled_mm``, nvjet), alone and with Inductor's add/mul kernel after it (#18).

torch._scaled_mm takes no C input, so the residual costs one more pass over the hidden states (read out and the
residual, write the sum) after each output GEMM: about 2 x 28 MB per single block at 4,608 tokens. The fused GEMM saves
that pass only where it runs within a few percent of cuBLAS: ``break_even_slowdown`` is the GEMM time the saved pass is
worth. Shapes (M tokens, K, N) of a 1024² step: the single blocks' proj_out (K 15,360), the double blocks' ff.net[2]
(K 12,288) and to_out (K 3,072). Timed inside CUDA graphs as bench/kernels_rows.py does (µs per launch, median of
replays). The run of 2026-12-01 (fifth session, commit 233a171) measured the kernel's first form, in this file then:
the residual read by TMA from one tensor, the gate one row. ``start_up_decision``: what the service's start-up check
(gemm_residual.measure) decides on the single blocks' shape, beside the same calls timed one per event pair.

    python bench/gemm_epilogue.py --out bench/results/gemm-epilogue-h200.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.kernels_rows import _us  # noqa: E402

log = logging.getLogger("bench.gemm_epilogue")
FP8 = torch.float8_e4m3fn
# (label, M, K, N, residual epilogue); the kernel always has one (the plain rate is cuBLAS's row)
SHAPES = (
    ("single_proj_out_4608x15360x3072", 4608, 15360, 3072, True),
    ("ff_out_4096x12288x3072", 4096, 12288, 3072, True),
    ("to_out_4096x3072x3072", 4096, 3072, 3072, True),
)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, persistent)
CONFIGS = ((128, 128, 128, 8, 4, True), (128, 256, 128, 8, 3, True), (128, 128, 128, 8, 4, False))


def build():
    """The package's kernel (flux_kontext/optimizations/kernels/gemm_residual.py) as ``gemm(..., config)``."""
    from flux_kontext.optimizations.kernels import gemm_residual

    def gemm(a, w, a_scale, w_scale, bias, residual, gate, config):
        m, n = residual.shape
        rows = residual.view(1, m, n)
        first, second = rows[:, : m // 2], rows[:, m // 2 :]  # two sources, as the single blocks' text and image
        return gemm_residual.launch(a, a_scale, w.t(), w_scale, bias, first, second, gate, config)

    return gemm


def _operands(m: int, k: int, n: int, seed: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale

    a_scale = randn(m, 1).abs() * 0.01 + 0.01
    w_scale = randn(1, n).abs() * 0.001 + 0.001
    a = randn(m, k, scale=100).clamp(-448, 448).to(FP8)
    w = randn(n, k, scale=100).clamp(-448, 448).to(FP8)  # (N, K) row-major: torchao's qdata; w.t() is what cuBLAS takes
    bias = randn(n, scale=0.1).to(torch.bfloat16)
    residual = randn(m, n, scale=2).to(torch.bfloat16)
    gate = randn(1, n, scale=0.5).to(torch.bfloat16)
    return a, w, a_scale, w_scale, bias, residual, gate


def bench_shape(gemm, m, k, n, residual: bool) -> dict:
    inputs = [_operands(m, k, n, seed) for seed in (0, 1)]

    def cublas(a, w, a_scale, w_scale, bias, r, gate):
        return torch._scaled_mm(
            a, w.t(), scale_a=a_scale, scale_b=w_scale, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
        )

    add = torch.compile(lambda r, gate, out: r + gate * out, fullgraph=True, dynamic=False)

    def cublas_then_residual(*args):
        return add(args[5], args[6], cublas(*args))

    variants = {"cublas": cublas}
    if residual:
        variants["cublas_then_inductor_residual"] = cublas_then_residual
    for config in CONFIGS:
        name = "triton_{}x{}x{}_{}w_{}s{}".format(*config[:5], "_persistent" if config[5] else "")
        variants[name] = lambda *args, c=config: gemm(*args, c).view(m, n)
    want = (cublas_then_residual if residual else cublas)(*inputs[0])
    row = {"tflop": round(2 * m * k * n / 1e12, 3)}
    for name, fn in variants.items():
        try:
            row[f"{name}_us"] = _us(fn, inputs)
            got = fn(*inputs[0]).float()
            if name != "cublas" or not residual:
                row[f"{name}_max_rel_diff"] = float((got - want.float()).abs().max() / want.float().abs().max())
            row[f"{name}_tflops"] = round(row["tflop"] / row[f"{name}_us"] * 1e6, 1)
        except Exception as exc:  # keep the other variants' numbers
            log.exception("variant %s failed", name)
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:400]
    triton_times = {k: v for k, v in row.items() if k.startswith("triton") and k.endswith("_us")}
    if triton_times:
        best = min(triton_times, key=triton_times.get)
        row["best_triton"] = best.removesuffix("_us")
        baseline = row.get("cublas_then_inductor_residual_us" if residual else "cublas_us")
        if baseline:
            row["best_triton_minus_baseline_us"] = round(triton_times[best] - baseline, 2)
        if residual and "cublas_us" in row and baseline:
            # the GEMM may be this much slower than cuBLAS before the fused epilogue stops paying
            row["break_even_slowdown"] = round((baseline - row["cublas_us"]) / row["cublas_us"], 3)
    return row


def start_up_decision() -> dict:
    """What the service's start-up check (gemm_residual.measure) decides on a single block's proj_out shape, and the
    same two calls timed one per event pair, as the check did before."""
    from flux_kontext.optimizations.kernels import gemm_residual

    k, n, m = 15360, 3072, 4608
    a, w, a_scale, w_scale, bias, residual, gate = _operands(m, k, n, seed=2)
    linear = SimpleNamespace(fp8_weight_t=w.t(), fp8_weight_scale=w_scale, bias=bias)
    decision = gemm_residual.measure(linear)
    rows = residual.view(1, m, n)
    first, second = rows[:, :512], rows[:, 512:]
    serial = {  # one call per event pair: the check's timing before 2026-12-03 (its host launch included)
        "serial_fused_ms": lambda: gemm_residual.launch(a, a_scale, w.t(), w_scale, bias, first, second, gate),
        "serial_cublas_ms": lambda: torch._scaled_mm(
            a, w.t(), a_scale, w_scale, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
        ),
    }
    for key, fn in serial.items():
        decision[key] = round(gemm_residual._ms(fn, repeats=10, calls=1), 4)
    return decision


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        gemm = build()
    except Exception as exc:
        log.exception("no Triton FP8 GEMM")
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        gemm = None
    for label, m, k, n, residual in SHAPES:
        if gemm is None:
            break
        try:
            result[label] = bench_shape(gemm, m, k, n, residual)
        except Exception as exc:
            log.exception("%s failed", label)
            result[label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        log.info("%s: %s", label, result[label])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if gemm is not None:
        try:
            result["start_up_decision"] = start_up_decision()
        except Exception as exc:
            log.exception("start-up decision failed")
            result["start_up_decision"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        log.info("start-up decision: %s", result["start_up_decision"])
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
