"""The fused FP8 blocks (flux_kontext/optimizations/kernels, fp8_blocks.py) on the GPU: each kernel against its
reference and against Inductor's compiled reference, then the full-size transformer with and without whole-block
fusion. Why: the kernels exist because Inductor's fused glue passed over each row twice; this checks that ours are
right and measures what they buy. Results: BENCHMARKS.md, "Fused FP8 blocks and FP8 attention".

1. Kernels on the 1024² shapes (text-to-image: 512 text + 4096 image tokens): for each, how far it is from its
   PyTorch reference (FP8 codes that differ, scale error, relative error), its time, the time of the same reference
   under torch.compile (what the service ran before), and the time the bytes alone take at 3 TB/s. Kernels are timed
   as raw Triton launches (a torch op called eagerly adds host overhead that compiled code does not pay). The GELU
   kernel is timed at 4, 8, 16 and 32 warps per row.
2. The full-size random transformer as the service builds it (the serving stack's fuse_qkv, low_precision_gemm and
   gelu_sigmoid_form; our processor on cuDNN attention), compiled, for a 1024² text-to-image and edit: the fused GELU
   alone (fused_gelu_fp8, the previous default) against whole blocks on the kernels (+ fused_norm_rope), and (where
   FA3 is installed) whole blocks with FA3 in FP8 (FLUX_FP8_ATTENTION). Each variant is its own stack subset on the
   same weights (fused_gelu_fp8 / fused_norm_rope in the blocks' body slot, then compile above it), its forwards
   cleared before the next. Each: ms per forward, relative error against the eager FP8 model (cuDNN bf16
   attention), and profiles by kernel family.

    python bench/fused_blocks.py --out bench/results/fused-blocks-h100.json
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    DEVICE,
    FUSED,
    apply_stack,
    clear_slots,
    fp8_agreement,
    full_random_transformer,
    fused_counts,
    header,
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
from flux_kontext.optimizations.attention.kernels import FA3_FP8, KernelChoice, cudnn, fa3_fp8, load_fa3  # noqa: E402
from flux_kontext.optimizations.attention.processor import (  # noqa: E402
    fp8_qk_scales,
    install,
    register_fp8_qk_scales,
)
from flux_kontext.settings import Settings  # noqa: E402
from flux_kontext.stack import ForwardSlots  # noqa: E402

log = logging.getLogger("bench.fused_blocks")
BYTES_PER_MS = 3e9  # 3 TB/s
# FP8 GEMMs, compile without multi-kernel; the fused path per variant (fused_norm_rope on or off).
SETTINGS = dict(low_precision_gemm="auto", compile_multi_kernel=False)


def _randn(*shape, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, torch.bfloat16)


def _timings(kernel, reference, nbytes: int) -> dict:
    compiled = torch.compile(reference)
    return {
        "kernel_ms": round(time_ms(kernel, repeats=50, warmup=3), 4),
        "inductor_ms": round(time_ms(compiled, repeats=50, warmup=3), 4),
        "bytes_floor_ms": round(nbytes / BYTES_PER_MS, 4),
    }


def check_kernels() -> dict:
    ops = kernels.ops()
    text, image, width, heads, eps = 512, 4096, 3072, 24, 1e-6
    result = {}

    attn, mlp = _randn(text + image, width, seed=1), _randn(text + image, 4 * width, scale=3, seed=2)
    row = fp8_agreement(kernels.gelu_fp8(attn, mlp), kernels.reference_gelu_fp8(attn, mlp))
    row |= _timings(
        lambda: ops.launch_gelu_fp8(attn, mlp, True, raw=True),
        lambda: kernels.reference_gelu_fp8(attn, mlp),
        (attn.numel() + mlp.numel()) * 3,
    )
    ff = mlp[:image]
    for warps in (4, 8, 16, 32):
        try:
            ops.launch_gelu_fp8(attn, mlp, True, warps, raw=True)  # compiles this configuration
            ops.launch_gelu_fp8(ff, ff, False, warps, raw=True)
            row[f"kernel_ms_{warps}_warps"] = round(
                time_ms(lambda w=warps: ops.launch_gelu_fp8(attn, mlp, True, w, raw=True), repeats=50, warmup=0), 4
            )
            row[f"feed_forward_kernel_ms_{warps}_warps"] = round(
                time_ms(lambda w=warps: ops.launch_gelu_fp8(ff, ff, False, w, raw=True), repeats=50, warmup=0), 4
            )
        except Exception as exc:
            row[f"kernel_{warps}_warps_error"] = f"{type(exc).__name__}: {exc}"[:300]
    result["gelu_fp8"] = row
    log.info("gelu_fp8: %s", row)

    first, second = _randn(1, text, width, seed=3), _randn(1, image, width, scale=4, seed=4)
    shift, scale = _randn(1, width, scale=0.5, seed=5), _randn(1, width, scale=0.5, seed=6)
    row = fp8_agreement(
        kernels.ln_mod_fp8(first, second, shift, scale, eps),
        kernels.reference_ln_mod_fp8(first, second, shift, scale, eps),
    )
    row |= _timings(
        lambda: ops.launch_ln_mod_fp8(first, second, shift, scale, True, eps, raw=True),
        lambda: kernels.reference_ln_mod_fp8(first, second, shift, scale, eps),
        (text + image) * width * 3,
    )
    for warps in (2, 4, 8, 16):
        ops.launch_ln_mod_fp8(first, second, shift, scale, True, eps, raw=True, num_warps=warps)  # compiles it
        row[f"kernel_ms_{warps}_warps"] = round(
            time_ms(
                lambda w=warps: ops.launch_ln_mod_fp8(first, second, shift, scale, True, eps, raw=True, num_warps=w),
                repeats=50,
                warmup=0,
            ),
            4,
        )
    # Diagnostic: the same against modulation computed in fp32 (no bf16 rounding between the ops), rounded once.
    x = torch.cat([first, second], dim=1).float()
    fp32 = torch.nn.functional.layer_norm(x, (width,), eps=eps) * (1 + scale.float()[:, None]) + shift.float()[:, None]
    fp32_ref = kernels.quantize_rowwise_fp8(fp32.to(torch.bfloat16).reshape(-1, width))
    got = kernels.ln_mod_fp8(first, second, shift, scale, eps)
    row |= {f"vs_fp32_modulation_{k}": v for k, v in fp8_agreement(got, fp32_ref).items()}
    result["ln_mod_fp8_two_sources"] = row
    log.info("ln_mod_fp8: %s", row)

    # A real rotary table: cos and sin of the same angles, repeated per pair (as FluxPosEmbed builds it).
    angles = (_randn(text + image, 64, seed=7).float() * 3).repeat_interleave(2, dim=1)
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    norms = [tuple(1 + 0.1 * _randn(128, seed=s) for s in seeds) for seeds in ((9, 10), (11, 12))]
    for label, sources in (
        ("qk_norm_rope_single", (_randn(1, text + image, 3 * width, seed=13), None)),
        ("qk_norm_rope_two_sources", (_randn(1, text, 3 * width, seed=14), _randn(1, image, 3 * width, seed=15))),
    ):
        args = (*sources, norms[0], norms[1] if sources[1] is not None else None, (cos, sin), heads, eps)
        got, want = kernels.qk_norm_rope(*args), kernels.reference_qk_norm_rope(*args)
        row = {f"{name}_rel_error": rel(g.float(), w.float()) for name, g, w in zip("qkv", got, want, strict=True)}
        row |= {
            f"{name}_max_abs_diff": float((g.float() - w.float()).abs().max())
            for name, g, w in zip("qkv", got, want, strict=True)
        }
        two = sources[1] is not None
        raw_args = (sources[0], sources[1] if two else sources[0], *norms[0], *norms[1 if two else 0], cos, sin)
        scales = fp8_qk_scales(
            [norms[0][0], norms[1][0]] if two else [norms[0][0]],
            [norms[0][1], norms[1][1]] if two else [norms[0][1]],
            128,
        )
        got = kernels.qk_norm_rope_fp8(*args, fp8_scales=scales)
        want = kernels.reference_qk_norm_rope_fp8(*args, fp8_scales=scales)
        for name, g, w in zip("qkv", got[:3], want[:3], strict=True):
            row[f"fp8_{name}_codes_differing_fraction"] = float((g.float() != w.float()).float().mean())
        row["fp8_v_descale_max_rel_diff"] = float(((got[3] - want[3]).abs() / want[3]).max())
        row["fp8_q_dequantized_rel_error_vs_bf16"] = rel(
            got[0].float() * scales[0], want_bf16 := kernels.reference_qk_norm_rope(*args)[0].float()
        )
        row["fp8_q_largest_scaled_value"] = float(want_bf16.abs().max() / scales[0])
        row |= _timings(
            lambda a=raw_args, t=two: ops.launch_qk_norm_rope(*a, cos, t, heads, eps, False, raw=True),
            lambda a=args: kernels.reference_qk_norm_rope(*a),
            (text + image) * 3 * width * 2 * 2,
        )
        row["fp8_kernel_ms"] = round(
            time_ms(
                lambda a=raw_args, sc=scales, t=two: ops.launch_qk_norm_rope(*a, sc, t, heads, eps, True, raw=True),
                repeats=50,
                warmup=0,
            ),
            4,
        )
        result[label] = row
        log.info("%s: %s", label, row)
    return result


def _cudnn_with_fa3_fp8(model, result: dict) -> KernelChoice:
    """Our processor on cuDNN (bf16), with FA3 in FP8 beside it where FA3 is installed (and the static q/k scales
    it reads, as the attention optimization registers them when FA3 in FP8 is usable): each variant picks one."""
    choice = KernelChoice(kernels={"cudnn": cudnn}, active="cudnn", fallback="cudnn")
    fa3, why = load_fa3()
    if fa3 is not None:
        choice.kernels[FA3_FP8] = fa3_fp8(fa3)
        register_fp8_qk_scales(model)
    result["fa3_fp8"] = "available" if fa3 is not None else why
    install(model, choice)
    return choice


@torch.inference_mode()
def main() -> int:
    out = output_path_from_args(__doc__)
    result = header()
    result["kernels"] = check_kernels()
    write_json(out, result)

    model = full_random_transformer()
    pipe = transformer_pipe(model)
    weights = apply_stack(pipe, Settings(**SETTINGS), ["fuse_qkv", "low_precision_gemm", "gelu_sigmoid_form"])
    choice = _cudnn_with_fa3_fp8(model, result)
    result["fp8"] = weights["low_precision_gemm"].status
    cases = step_cases()
    eager = {case: model(**kwargs)[0].float() for case, kwargs in cases.items()}
    result["cases"] = {case: {} for case in cases}
    variants = [("fused_gelu_fp8", False, "cudnn"), ("fused_norm_rope", True, "cudnn")]
    if FA3_FP8 in choice.kernels:
        variants.append(("fused_norm_rope+fp8_attention", True, FA3_FP8))
    variants.append(("fused_gelu_fp8_again", False, "cudnn"))
    slots = ForwardSlots()  # every variant's forwards, on the same blocks
    for label, norm_rope, kernel in variants:
        choice.active = kernel
        torch._dynamo.reset()
        settings = Settings(**SETTINGS, fused_norm_rope=norm_rope)
        fused = apply_stack(pipe, settings, FUSED, slots=slots)
        result[f"{label}_counts"] = fused_counts(fused)
        eager_fused = {case: model(**kwargs)[0].float() for case, kwargs in cases.items()}
        apply_stack(pipe, settings, ["compile"], slots=slots)  # the compiled slot above the fused body
        for case, kwargs in cases.items():
            row = result["cases"][case]
            output, ms = output_and_ms(model, kwargs, warmup=3, repeats=10)
            row[f"{label}_ms"] = round(ms, 3)
            row[f"{label}_vs_eager_fp8_rel_error"] = rel(output, eager[case])
            row[f"{label}_eager_vs_eager_fp8_rel_error"] = rel(eager_fused[case], eager[case])
            log.info("%s %s: %s", case, label, {k: v for k, v in row.items() if k.startswith(label)})
        if label.startswith("fused_norm_rope"):
            result[f"profile_text_to_image_{label}"] = profile_forward(model, cases["text_to_image"])
            result[f"profile_edit_{label}"] = profile_forward(model, cases["edit"])
        clear_slots(slots)  # diffusers' forwards again for the next variant
        write_json(out, result)
    for row in result["cases"].values():
        before = (row["fused_gelu_fp8_ms"] + row["fused_gelu_fp8_again_ms"]) / 2
        row["gain_fused_norm_rope"] = round(before / row["fused_norm_rope_ms"], 4)
        if "fused_norm_rope+fp8_attention_ms" in row:
            row["gain_fp8_attention"] = round(row["fused_norm_rope_ms"] / row["fused_norm_rope+fp8_attention_ms"], 4)
    log.info("result: %s", result["cases"])
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
