"""What the GPU benches share, so that each says only what it measures.

- the full-size random transformer and the inputs of one 1024² step (text-to-image, edit);
- a subset of the serving stack applied to it (``apply_stack``: ``stack_for(settings, only=...)``, in serving order,
  on this GPU; later subsets on the same model share its forward slots), and the slots cleared again
  (``clear_slots``): how a bench switches the fused forwards or compile off and builds another subset on the same
  weights;
- ONE timing helper, ``time_ms`` (CUDA events), and ``output_and_ms`` for the warm-up / output / timed pattern of a
  transformer forward;
- the CUDA time of one forward by kernel family (``profile_forward``), FP8 codes against their reference
  (``fp8_agreement``);
- the command line (``--out``) and the JSON result, which starts with the device, versions and date.

Nothing here touches the GPU at import time: ``--help`` works on any machine. Numbers: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import FluxTransformer2DModel

from flux_kontext.gpu_timing import gpu_milliseconds
from flux_kontext.logging_setup import configure_logging
from flux_kontext.models import FULL_TRANSFORMER, step_inputs
from flux_kontext.settings import Settings
from flux_kontext.stack import SLOTS, ForwardSlots, Hardware, Stack, stack_for

DEVICE = torch.device("cuda")
FUSED = ("fused_gelu_fp8", "fused_norm_rope")  # the optimizations that put our kernels in the blocks' body slot
# Installed distributions whose version a result records (besides python and torch's CUDA).
PACKAGES = ("torch", "diffusers", "transformers", "torchao", "triton", "fa3-fwd", "flash-attn-3")


# ----- the model and its inputs ----------------------------------------------------------------------------------
def full_random_transformer() -> FluxTransformer2DModel:
    """The full-size FLUX transformer, random weights (seed 0), bf16, built on the GPU."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return FluxTransformer2DModel(**FULL_TRANSFORMER).to(torch.bfloat16).eval()


def inputs(image_tokens: int, context_tokens: int) -> dict:
    """Transformer inputs of a 1024² step: 512 text tokens, image tokens (+ context tokens for an edit)."""
    config = SimpleNamespace(in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    return step_inputs(config, DEVICE, torch.bfloat16, image_tokens, context_tokens)


def step_cases() -> dict[str, dict]:
    """The two steps every transformer bench runs: a 1024² text-to-image (4,608 tokens) and edit (8,704 tokens)."""
    return {"text_to_image": inputs(4096, 0), "edit": inputs(4096, 4096)}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


# ----- the stack -------------------------------------------------------------------------------------------------
def transformer_pipe(transformer) -> SimpleNamespace:
    """What the stack's transformer optimizations need of a pipeline: the transformer (no VAE)."""
    return SimpleNamespace(transformer=transformer, vae=None)


def cuda_hardware() -> Hardware:
    return Hardware("cuda", torch.cuda.get_device_capability())


def apply_stack(pipe, settings: Settings, names: Iterable[str], slots: ForwardSlots | None = None) -> Stack:
    """The optimizations ``names`` of the serving stack for ``settings``, in serving order, applied to ``pipe`` on
    this GPU. The Stack records an optimization that raised as failed and goes on (the service must not go down);
    a bench would then measure something else, so it stops here with the reason.

    ``slots``: the forward slots of an earlier stack on the same model. A module's forward belongs to one
    ForwardSlots for good (flux_kontext/stack/slots.py), so a bench that builds one subset after another on one model
    (compile, then the fused body below it; compile again with other options) hands them all the same slots, and a
    slot set by a later stack rebuilds the slots above it."""
    stack = stack_for(settings, only=names, slots=slots)
    stack.apply(pipe, cuda_hardware())
    failed = [f"{report.name}: {report.detail}" for report in stack.reports() if report.status == "failed"]
    if failed:
        raise RuntimeError(f"optimization failed: {'; '.join(failed)}")
    return stack


def clear_slots(slots: ForwardSlots) -> None:
    """Every module with forward slots calls its class's forward again (the outermost slot is cleared first, so that
    no wrapper above is rebuilt on the way). What is not a forward (weights, attention processors, hooks) stays."""
    for slot in reversed(SLOTS):
        slots.clear_everywhere(slot)


def fused_counts(stack: Stack) -> dict[str, int]:
    """How many MLP outputs and whole blocks the fused optimizations of ``stack`` rerouted (0 where not applied)."""
    data = {key: value for name in FUSED if name in stack for key, value in stack[name].report().data.items()}
    return {key: data.get(key, 0) for key in ("mlp_outputs", "single_blocks", "double_blocks")}


# ----- timing ----------------------------------------------------------------------------------------------------
def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def time_ms(fn: Callable[[], object], *, repeats: int, warmup: int, per_call: bool = False) -> float:
    """Milliseconds per call of ``fn``, by CUDA events, after ``warmup`` untimed calls.

    Default: one pair of events around ``repeats`` back-to-back calls, their mean (launches queue ahead of the GPU
    as they do when serving). ``per_call``: events around each call and a synchronize after it, the median of
    ``repeats`` (each call starts on an idle GPU; one slow call does not move it). With ``repeats=1`` either is the
    duration of one call, host work included (a first call that compiles, a graph capture): the start event runs as
    soon as the work queued before it is done."""
    if not per_call:
        return gpu_milliseconds(fn, repeats, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = _events()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def output_and_ms(model, kwargs: dict, *, warmup: int, repeats: int) -> tuple[torch.Tensor, float]:
    """A transformer forward: ``warmup`` untimed calls (compile, first kernel choices), one call whose output is kept
    (fp32), then ``time_ms`` of ``repeats`` calls."""
    for _ in range(warmup):
        model(**kwargs)
    output = model(**kwargs)[0].float()
    return output, time_ms(lambda: model(**kwargs), repeats=repeats, warmup=0)


# ----- what a kernel computes and where a forward's time goes -----------------------------------------------------
def fp8_agreement(got: tuple, want: tuple) -> dict:
    """Rowwise e4m3 (values, scales) against a reference's: codes that differ, scale error, dequantized error."""
    (values, scale), (ref_values, ref_scale) = got, want
    return {
        "values_differing_fraction": float((values.float() != ref_values.float()).float().mean()),
        "scale_max_rel_diff": float(((scale - ref_scale).abs() / ref_scale).max()),
        "dequantized_rel_error": rel(values.float() * scale, ref_values.float() * ref_scale),
    }


def kernel_family(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("triton"):  # Inductor's fused kernels name the ops they fuse (scaled_mm, sdpa...)
        return "triton_glue"
    if any(k in lowered for k in ("flash", "fmha", "cudnn", "attention", "sdpa")):  # before "cutlass": FA3 is one
        return "attention"
    if any(k in lowered for k in ("gemm", "cutlass", "nvjet", "xmma", "scaled_mm", "f8f8")):
        return "gemm"
    if any(k in lowered for k in ("gelu_fp8", "ln_mod_fp8", "rows_fp8", "qk_norm_rope", "v_fp8")):
        return "our_kernels"  # flux_kontext/optimizations/kernels
    return "other"


def profile_forward(model, kwargs) -> dict:
    """CUDA time of one forward by kernel family, and its 30 costliest kernels."""
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


# ----- command line and result -----------------------------------------------------------------------------------
def output_path_from_args(description: str | None) -> Path:
    """The bench's one flag, ``--out`` (the JSON result); ``--help`` prints ``description`` (its docstring)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON result is written")
    path = parser.parse_args().out
    configure_logging()
    return path


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def header() -> dict:
    """What every result starts with: the GPU, torch, the versions that matter, the date (UTC)."""
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "versions": versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: Path, result: dict) -> None:
    """(Re)write the result; benches call it after each part, so a run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
