"""Attention: our Flux attention processor with a pluggable kernel, the kernel picked by measurement.

Kernels (q, k, v and the output are (batch, tokens, heads, head_dim)):
- sdpa:  PyTorch scaled_dot_product_attention, PyTorch picks the backend (the CPU path).
- cudnn: SDPA forced to cuDNN's fused attention: close behind FA3 on H100 (docs/FACTS.md), the GPU fallback.
- fa3:   FlashAttention 3 forward from the fa3-fwd wheel (or flash-attn-3's flash_attn_interface). diffusers'
         own `_flash_3` backend does not detect fa3-fwd, hence our processor.
- fa3_fp8: the same in FP8 (e4m3 q, k, v with per-head scales; FA3 also rounds the probabilities to e4m3), only with
         FLUX_FP8_ATTENTION=true: a lower-precision tier, not a drop-in kernel, so it is never picked by timing.
         The fused FP8 blocks (fused_fp8.py) quantize q and k in their RoPE kernel and call ``fp8_call``.
At start-up each available kernel is checked against an fp32 reference and timed on the model's own token
counts (text-to-image and edit at 1024²); the fastest correct one is kept. `use_flash_attention: false`
switches a request to the fastest non-FA3 kernel.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flux_kontext.optimizations import OptimizationContext, Report
from flux_kontext.optimizations.quantization import E4M3_MAX, quantize_per_head, quantize_static

log = logging.getLogger(__name__)

NAME = "attention"
FA3 = "flash_attention_3"
# Tokens of a 1024² text-to-image (512 text + 4096 image) and edit (+ 4096 context) step.
TIMING_TOKENS = (4608, 8704)
MAX_RELATIVE_ERROR = 2e-2  # bf16 kernels land near 3e-3 against fp32; anything far above is a wrong kernel
FP8_MAX_RELATIVE_ERROR = 0.1  # FA3 FP8 lands near 5e-2 on these random inputs (docs/FACTS.md); far above: broken
FA3_FP8 = "fa3_fp8"
# FA3 must beat the best other kernel by this much to be kept: on H100 the two tie within run-to-run noise, and
# each kept kernel costs a compile variant at warm-up.
FA3_MIN_GAIN = 0.02


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return _sdpa(q, k, v)


def _load_fa3() -> tuple[Callable | None, str]:
    """FlashAttention 3's forward, from whichever package provides it; (None, why) when none does."""
    for module_name, package in (("fa3_fwd_interface", "fa3-fwd"), ("flash_attn_interface", "flash-attn-3")):
        try:
            module = __import__(module_name)
        except Exception as exc:  # ImportError, or a wheel built for another CUDA/torch
            log.debug("FA3 from %s unavailable: %s", package, exc)
            continue
        return module.flash_attn_func, package
    return None, "no FlashAttention 3 package importable (pip install fa3-fwd, on CUDA 13 / torch >= 2.10)"


def _fa3_fp8(flash_attn_func: Callable) -> Callable:
    """FA3 in FP8. As a kernel it takes bf16 q, k, v and the attention module: q and k are quantized with the
    module's static scales (``fp8_qk_scale``, as the fused blocks' RoPE kernel does), per head without them; v per
    head. ``kernel.fp8_call`` takes e4m3 tensors and their descales (batch, heads) directly. The output is bf16."""

    def fp8_call(q8, k8, v8, q_descale, k_descale, v_descale):
        out = flash_attn_func(q8, k8, v8, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
        return out[0] if isinstance(out, tuple) else out

    def kernel(q, k, v, attn=None):
        v8, v_descale = quantize_per_head(v)
        scales = getattr(attn, "fp8_qk_scale", None)
        if scales is None:
            (q8, q_descale), (k8, k_descale) = quantize_per_head(q), quantize_per_head(k)
        else:
            q8, k8 = quantize_static(q, scales[0]), quantize_static(k, scales[1])
            q_descale, k_descale = (scale.expand_as(v_descale).contiguous() for scale in scales)
        return fp8_call(q8, k8, v8, q_descale, k_descale, v_descale)

    kernel.fp8_call = fp8_call
    kernel.takes_module = True
    return kernel


def fp8_qk_scales(norm_weights_q, norm_weights_k, head_dim: int) -> torch.Tensor:
    """Static e4m3 scales (q, k) for RMS-normed, rotated q and k: after RMSNorm a head's squares sum to head_dim, so
    no element exceeds sqrt(head_dim) · max|weight|, and RoPE turns pairs without changing their length. The bound
    holds for every input; e4m3's relative precision is the same across its normal range, so a loose bound costs
    only values below 2^-6 of it."""
    bounds = [max(float(w.detach().abs().max()) for w in weights) for weights in (norm_weights_q, norm_weights_k)]
    return torch.tensor(bounds, dtype=torch.float32, device=norm_weights_q[0].device) * head_dim**0.5 / E4M3_MAX


def register_fp8_qk_scales(transformer) -> int:
    """Give every attention module with RMS-normed q/k its static FP8 scales (buffer ``fp8_qk_scale``; the text
    stream's norms count too); returns how many."""
    count = 0
    for module in transformer.modules():
        if getattr(module, "norm_q", None) is None or getattr(module.norm_q, "weight", None) is None:
            continue
        added = getattr(module, "norm_added_q", None) is not None
        weights_q = [module.norm_q.weight, *([module.norm_added_q.weight] if added else [])]
        weights_k = [module.norm_k.weight, *([module.norm_added_k.weight] if added else [])]
        scales = fp8_qk_scales(weights_q, weights_k, module.head_dim)
        module.register_buffer("fp8_qk_scale", scales, persistent=False)
        count += 1
    return count


def _returning_output(flash_attn_func: Callable) -> Callable:
    """Some FA3 builds return (out, lse); the processor wants the output alone."""

    def kernel(q, k, v):
        result = flash_attn_func(q, k, v)
        return result[0] if isinstance(result, tuple) else result

    return kernel


@dataclass
class KernelChoice:
    """The kernel every processor calls; ``active`` may be switched for one request."""

    kernels: dict[str, Callable] = field(default_factory=dict)
    active: str = "sdpa"
    fallback: str = "sdpa"  # best kernel that is not FA3

    def __call__(self, q, k, v, attn=None):
        kernel = self.kernels[self.active]
        return kernel(q, k, v, attn) if getattr(kernel, "takes_module", False) else kernel(q, k, v)

    @property
    def fp8(self) -> bool:
        """FA3 in FP8 is active (for this request): callers may hand e4m3 q/k/v to ``fp8_call``."""
        return self.active == FA3_FP8

    def fp8_call(self, *args):
        return self.kernels[FA3_FP8].fp8_call(*args)

    @contextlib.contextmanager
    def use(self, name: str):
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous


class KernelFluxAttnProcessor:
    """FLUX attention (joint text/image, RMS-normed q/k, RoPE) calling ``choice`` for the attention itself."""

    def __init__(self, choice: KernelChoice):
        self.choice = choice

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("FLUX.1-Kontext attention takes no mask")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.choice(q, k, v, attn).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes(
            [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def _relative_error(kernel: Callable, device: torch.device) -> float:
    q, k, v = (torch.randn(1, 1024, 24, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    reference = (
        _sdpa(q.double(), k.double(), v.double()) if device.type == "cpu" else _sdpa(q.float(), k.float(), v.float())
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
    call = _timed_call(kernel, q, k, v)
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeats


def _candidates(setting: str, fp8: bool = False) -> tuple[dict[str, Callable], dict[str, str]]:
    kernels, missing = {"cudnn": _cudnn, "sdpa": _sdpa}, {}
    fa3, why = _load_fa3()
    if fa3 is not None:
        kernels["fa3"] = _returning_output(fa3)
    else:
        missing["fa3"] = why
    if setting != "auto":
        kernels = {setting: kernels[setting]} if setting in kernels else {}
    if fp8 and setting not in ("auto", "fa3"):
        missing[FA3_FP8] = f"FLUX_ATTENTION={setting}"
    elif fp8 and fa3 is not None:
        kernels[FA3_FP8] = _fa3_fp8(fa3)
    elif fp8:
        missing[FA3_FP8] = why
    return kernels, missing


def measure_kernels(
    setting: str, device: torch.device, fp8: bool = False
) -> tuple[dict[str, Callable], dict[str, dict], dict[str, str]]:
    """Check and time each candidate kernel; returns (usable kernels, their measurements, rejected -> why)."""
    kernels, rejected = _candidates(setting, fp8)
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


def _summary(measured: dict[str, dict]) -> str:
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


@torch.inference_mode()
def screen_fp8_attention(transformer, choice: KernelChoice) -> dict:
    """FA3 in FP8 against the active bf16 kernel on the loaded weights, one 1024² text-to-image step (eager): the
    relative error of every layer's attention output (both kernels on the same q, k, v, as the model produces them;
    q and k with the static scales serving uses) and of the transformer's output. The per-layer errors decide: on
    random weights the output barely depends on attention (zeroing it moves the tiny model's output by 2%), so the
    output error alone would prove nothing."""
    from flux_kontext.models import step_inputs

    bf16, fp8, layer_errors = choice.kernels[choice.active], choice.kernels[FA3_FP8], []

    def both(q, k, v, attn):
        reference = bf16(q, k, v)
        got = fp8(q, k, v, attn).to(reference.dtype)
        layer_errors.append(float((got.float() - reference.float()).norm() / reference.float().norm()))
        return reference

    both.takes_module = True

    parameter = next(transformer.parameters())
    inputs = step_inputs(transformer.config, parameter.device, parameter.dtype, TIMING_TOKENS[0] - 512)
    choice.kernels["screen"] = both
    try:
        with choice.use("screen"):
            reference = transformer(**inputs)[0].float()
    finally:
        del choice.kernels["screen"]
    with choice.use(FA3_FP8):
        output = transformer(**inputs)[0].float()
    ranked = sorted(layer_errors)
    return {
        "layer_error_max": ranked[-1],
        "layer_error_median": ranked[len(ranked) // 2],
        "layers": len(ranked),
        "output_error": float((output - reference).norm() / reference.norm()),
    }


def _install(pipe, choice: KernelChoice) -> None:
    pipe.transformer.set_attn_processor(KernelFluxAttnProcessor(choice))


def apply(pipe, context: OptimizationContext) -> list[Report]:
    """Install our processor with the fastest correct kernel; report it and FlashAttention 3's state."""
    setting = context.settings.attention
    if context.device_type != "cuda":
        if setting not in ("auto", "sdpa"):
            raise ValueError(f"FLUX_ATTENTION={setting} needs a CUDA GPU")
        _install(pipe, KernelChoice(kernels={"sdpa": _sdpa}))
        return [
            Report(NAME, "applied", "PyTorch scaled_dot_product_attention on CPU"),
            Report(
                FA3,
                "unavailable",
                "FlashAttention 3 needs an NVIDIA Hopper GPU (sm_90); this is a CPU",
                flag="use_flash_attention",
            ),
        ]
    device = torch.device("cuda", torch.cuda.current_device())
    mode = context.settings.fp8_attention
    usable, measured, rejected = measure_kernels(setting, device, fp8=mode != "off")
    timing = {name: sum(m[f"ms_{t}"] for t in TIMING_TOKENS) for name, m in measured.items() if name != FA3_FP8}
    if not timing:
        raise RuntimeError(f"no usable attention kernel for FLUX_ATTENTION={setting}: {rejected}")
    best, fallback, within_noise = select_kernel(timing)
    choice = KernelChoice(kernels=usable, active=best, fallback=fallback)
    _install(pipe, choice)
    tokens = "/".join(str(t) for t in TIMING_TOKENS)
    detail = f"{best} (fastest at {tokens} tokens; measured {_summary(measured)})"
    if FA3_FP8 in usable:
        register_fp8_qk_scales(pipe.transformer)
        screen = screen_fp8_attention(pipe.transformer, choice)
        measured[FA3_FP8]["screen"] = screen
        limit = context.settings.fp8_max_layer_error
        step = (
            f"on a 1024² step its {screen['layers']} attention outputs moved by {screen['layer_error_median']:.1e} "
            f"median, {screen['layer_error_max']:.1e} max, the transformer output by {screen['output_error']:.1e}"
        )
        if mode == "on" or screen["layer_error_max"] <= limit:
            choice.active = FA3_FP8
            within = "no limit" if mode == "on" else f"within FLUX_FP8_MAX_LAYER_ERROR={limit}"
            detail = f"fa3_fp8 (FLUX_FP8_ATTENTION={mode}: {step}; {within}; measured {_summary(measured)})"
        else:
            detail += f"; FA3 in FP8 not used: {step}, above FLUX_FP8_MAX_LAYER_ERROR={limit}"
    elif mode != "off":
        detail += f"; FA3 in FP8 not usable: {rejected.get(FA3_FP8)}"
        if mode == "on":
            log.warning("FLUX_FP8_ATTENTION=on but FA3 in FP8 is not usable: %s", rejected.get(FA3_FP8))
    active = choice.active
    reports = [Report(NAME, "applied", detail, data={"measured": measured, "rejected": rejected})]
    if active == FA3_FP8:
        reports.append(
            Report(
                FA3,
                "applied",
                f"FA3 in FP8 (FLUX_FP8_ATTENTION={mode}): e4m3 q/k with static scales from their RMSNorm bound, v "
                f"with per-head scales; per request falls back to {choice.fallback} in bf16",
                flag="use_flash_attention",
                disable=lambda: choice.use(choice.fallback),
            )
        )
    elif best == "fa3":
        reports.append(
            Report(
                FA3,
                "applied",
                f"fa3 kernel active; per request falls back to {choice.fallback}",
                flag="use_flash_attention",
                disable=lambda: choice.use(choice.fallback),
            )
        )
    elif "fa3" in usable:
        margin = f"not {FA3_MIN_GAIN:.0%} faster than" if within_noise else "measured slower than"
        reports.append(
            Report(
                FA3,
                "skipped",
                f"{margin} {best} on this GPU ({_summary(measured)})",
                flag="use_flash_attention",
            )
        )
    elif setting not in ("auto", "fa3"):
        reports.append(Report(FA3, "skipped", f"FLUX_ATTENTION={setting}", flag="use_flash_attention"))
    else:
        reports.append(
            Report(
                FA3,
                "unavailable",
                f"FlashAttention 3 not usable: {rejected.get('fa3')}; using {best}",
                flag="use_flash_attention",
            )
        )
    return reports
