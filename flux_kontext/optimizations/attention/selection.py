"""Which attention kernel: each available one checked against an fp32 reference and timed on the model's own token
counts (1024² text-to-image and edit); the fastest correct one is kept, FA3 only with a margin."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flux_kontext.gpu_timing import gpu_milliseconds
from flux_kontext.optimizations.attention.kernels import FA3_FP8, cudnn, fa3_bf16, fa3_fp8, load_fa3, sdpa
from flux_kontext.optimizations.kernels.e4m3 import quantize_per_head

# Tokens of a 1024² text-to-image (512 text + 4096 image) and edit (+ 4096 context) step.
TIMING_TOKENS = (4608, 8704)
MAX_RELATIVE_ERROR = 2e-2  # bf16 kernels land near 3e-3 against fp32; anything far above is a wrong kernel
FP8_MAX_RELATIVE_ERROR = 0.1  # FA3 FP8 lands near 5e-2 on these random inputs (docs/FACTS.md); far above: broken
# FA3 must beat the best other kernel by this much to be kept: on H100 the two tie within run-to-run noise, and
# each kept kernel costs a compile variant at warm-up.
FA3_MIN_GAIN = 0.02


def _relative_error(kernel: Callable, device: torch.device) -> float:
    q, k, v = (torch.randn(1, 1024, 24, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    reference = (
        sdpa(q.double(), k.double(), v.double()) if device.type == "cpu" else sdpa(q.float(), k.float(), v.float())
    )
    out = kernel(q, k, v).to(reference.dtype)
    return float((out - reference).norm() / reference.norm())


def _timed_call(kernel: Callable, q, k, v) -> Callable[[], torch.Tensor]:
    """What to time: the kernel; for FA3 in FP8 the attention alone on e4m3 inputs, since serving quantizes q, k, v
    inside the fused blocks' RoPE kernel, not in eager ops around the attention."""
    if hasattr(kernel, "fp8_call"):
        (q8, q_descale), (k8, k_descale), (v8, v_descale) = (quantize_per_head(t) for t in (q, k, v))
        return lambda: kernel.fp8_call(q8, k8, v8, q_descale, k_descale, v_descale)
    return lambda: kernel(q, k, v)


def _milliseconds(kernel: Callable, tokens: int, device: torch.device, repeats: int = 20) -> float:
    q, k, v = (torch.randn(1, tokens, 24, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    return gpu_milliseconds(_timed_call(kernel, q, k, v), repeats, warmup=3)


def candidates(setting: str, fp8: bool = False) -> tuple[dict[str, Callable], dict[str, str]]:
    kernels, missing = {"cudnn": cudnn, "sdpa": sdpa}, {}
    fa3, why = load_fa3()
    if fa3 is not None:
        kernels["fa3"] = fa3_bf16(fa3)
    else:
        missing["fa3"] = why
    if setting != "auto":
        kernels = {setting: kernels[setting]} if setting in kernels else {}
    if fp8 and setting not in ("auto", "fa3"):
        missing[FA3_FP8] = f"FLUX_ATTENTION={setting}"
    elif fp8 and fa3 is not None:
        kernels[FA3_FP8] = fa3_fp8(fa3)
    elif fp8:
        missing[FA3_FP8] = why
    return kernels, missing


def measure_kernels(
    setting: str, device: torch.device, fp8: bool = False
) -> tuple[dict[str, Callable], dict[str, dict], dict[str, str]]:
    """Check and time each candidate kernel; returns (usable kernels, their measurements, rejected -> why)."""
    kernels, rejected = candidates(setting, fp8)
    usable, measured = {}, {}
    for name, kernel in kernels.items():
        try:
            error = _relative_error(kernel, device)
            if not error < (FP8_MAX_RELATIVE_ERROR if name == FA3_FP8 else MAX_RELATIVE_ERROR):
                rejected[name] = f"relative error {error:.2e} against fp32"
                continue
            measured[name] = {"error": error, **{f"ms_{t}": _milliseconds(kernel, t, device) for t in TIMING_TOKENS}}
            usable[name] = kernel
        except Exception as exc:
            rejected[name] = f"{type(exc).__name__}: {exc}"
    return usable, measured, rejected


def summary(measured: dict[str, dict]) -> str:
    return "; ".join(
        f"{name} " + "/".join(f"{m[f'ms_{t}']:.3f}" for t in TIMING_TOKENS) + " ms" for name, m in measured.items()
    )


def select_kernel(timing: dict[str, float]) -> tuple[str, str, bool]:
    """(kernel to use, best non-FA3 kernel, whether FA3 was fastest but within FA3_MIN_GAIN of the fallback)."""
    best = min(timing, key=timing.get)
    non_fa3 = [name for name in timing if name != "fa3"]
    fallback = min(non_fa3, key=timing.get) if non_fa3 else best
    within_noise = best == "fa3" and bool(non_fa3) and timing["fa3"] > (1 - FA3_MIN_GAIN) * timing[fallback]
    return (fallback if within_noise else best), fallback, within_noise
