"""The LoRA side path's levers, layer by layer, on one single block's and one double block's FP8 GEMMs at the 1024²
edit's 8704 tokens, each variant under torch.compile (Inductor default mode) with the pointwise residual that reads
the block's output projection (so Inductor can fuse what it would fuse in the block). Part of bench/lora.py's run
(``layer_levers``); alone:

    python bench/lora_layers.py --out /tmp/lora-layers.json

Variants (rank 16, one adapter; the single block's q|k|v part of to_qkv's side is 3 x 16 wide):
- ``base``: the FP8 GEMMs alone (no adapter: what a request without one runs).
- ``before``: the side path as it was (bf16 copy of the FP8 activations, bf16 down projection, out-of-place addmm).
- ``now``: as served (lora_gemm.py): down projection from the FP8 activations with A in e4m3, one for the single
  block's proj_mlp + to_qkv, up projection added in place inside one custom op.
- ``now_unshared``: ``now`` with a down projection per layer (lever a alone).
- ``now_out_of_place``: ``now`` with an out-of-place ``torch.addmm`` for the up projection (lever c alone).
- ``now_add_in_consumer``: ``now``, except the output projection's up projection as ``mm`` + add, which Inductor
  fuses into the residual.
- ``served``: as served before K-augmentation: ``now`` with lora_triton's kernel on the wide outputs (q|k|v, MLP in)
  and cuBLAS on the 3072-wide one (what ``lora_triton.choose`` picked).
- ``k_aug_k16`` .. ``k_aug_k256``: the up projection folded into the wide GEMMs (lora_k_augment.py): [x8 | t']
  against [W8 | B'] (the single block's two layers on one x_aug), t' written by lora_fold_input's kernel, x_aug's width
  padded to a multiple of 16 .. 256 (zero weights); the output projection / MLP-down as ``served``. And
  ``lora_k_augment.choose``'s own measurement of the same shapes at 4608 rows (what the service decides at start).
Lever b (A's rows folded into the base GEMM as extra output rows) is timed as GEMMs (eager: cuBLAS calls either
way): to_qkv's GEMM with 64 more rows against to_qkv's GEMM plus the shared down projection. And the error of h =
x A^T with A in e4m3 against A in bf16 (both from the same FP8 activations) against fp32.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flux_kontext.optimizations import lora_gemm, lora_k_augment  # noqa: E402
from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8  # noqa: E402

RANK = 16


def _smm(values, scale, weight_t, weight_scale, dtype):
    return torch._scaled_mm(values, weight_t, scale_a=scale, scale_b=weight_scale, out_dtype=dtype, use_fast_accum=True)


class Layer:
    """One FP8 layer (in -> out) with a rank-``width`` side path's buffers."""

    def __init__(self, fan_in: int, fan_out: int, width: int, device, dtype, generator):
        weight = torch.randn(fan_out, fan_in, device=device, generator=generator) / fan_in**0.5
        values, scale = quantize_rowwise_fp8(weight)
        self.weight_t, self.weight_scale = values.t(), scale.t()
        self.down = (torch.randn(width, fan_in, device=device, generator=generator) / fan_in**0.5).to(dtype)
        self.up = (torch.randn(fan_out, width, device=device, generator=generator) * 0.06 / width**0.5).to(dtype)
        down8, down_scale = quantize_rowwise_fp8(self.down)
        self.down8, self.down_scale = down8, down_scale.view(1, -1)
        self.dtype = dtype

    def base(self, values, scale):
        return _smm(values, scale, self.weight_t, self.weight_scale, self.dtype)

    def before(self, values, scale):
        out = self.base(values, scale)
        low = torch.mm(values.to(self.dtype), self.down.t()) * scale
        return torch.addmm(out, low.to(self.dtype), self.up.t())

    def low(self, values, scale):
        return lora_gemm.down_projection(values, scale, self.down8, self.down_scale, self.dtype)

    def now(self, values, scale, low=None, triton=False):
        low = self.low(values, scale) if low is None else low
        args = (values, scale, self.weight_t, self.weight_scale, None, low, self.up, self.dtype, triton)
        return lora_gemm.fp8_linear_low_rank(*args)

    def now_triton(self, values, scale, low=None):
        return self.now(values, scale, low, triton=True)

    def out_of_place(self, values, scale, low):
        return torch.addmm(self.base(values, scale), low, self.up.t())

    def add_in_consumer(self, values, scale):
        return self.base(values, scale) + torch.mm(self.low(values, scale), self.up.t())

    def folded(self, multiple: int, extra: int | None = None, start: int = 0, t_scale=None):
        """This layer's W_aug (``extra`` t' columns, its own from ``start``, x_aug padded to ``multiple``),
        B' filled; its t' factors written into ``t_scale`` (a view of a shared one) or a new one."""
        width = self.up.shape[1]
        extra = width if extra is None else extra
        pad = lora_k_augment.padding(self.weight_t.shape[0], extra, multiple)
        weight = lora_k_augment.AugmentedWeight(self.weight_t, self.weight_scale, extra, start, width, pad)
        t_scale = torch.zeros(1, width, device=self.up.device) if t_scale is None else t_scale
        weight.fill(self.up, t_scale)
        return weight, t_scale

    def k_aug(self, multiple: int):
        """A callable (values, scale) -> output on the folded GEMM, with its own x_aug."""
        weight, t_scale = self.folded(multiple)
        counters = torch.zeros(2, dtype=torch.int32, device=t_scale.device)

        def fn(values, scale):
            low = self.low(values, scale)
            x_aug, scale = lora_k_augment.augmented_input(values, scale, low, t_scale, counters, weight)
            return lora_k_augment.augmented_linear(x_aug, scale, weight, None, self.dtype)

        return fn


def shared_low(layers, values, scale):
    """One down projection for layers that read the same activations (their A rows concatenated, as
    lora_side.SharedInput keeps them)."""
    down8 = torch.cat([layer.down8 for layer in layers])
    down_scale = torch.cat([layer.down_scale for layer in layers], dim=1)
    low = lora_gemm.down_projection(values, scale, down8, down_scale, layers[0].dtype)
    widths = [layer.down8.shape[0] for layer in layers]
    return low.split(widths, dim=1)


def folded_pair(first: Layer, second: Layer, multiple: int):
    """Two layers on one input, one x_aug: (values, scale) -> (first's output, second's output), and what went in."""
    widths = [first.up.shape[1], second.up.shape[1]]
    t_scale = torch.zeros(1, sum(widths), device=first.up.device)
    (w1, _), (w2, _) = (
        first.folded(multiple, sum(widths), 0, t_scale[:, : widths[0]]),
        second.folded(multiple, sum(widths), widths[0], t_scale[:, widths[0] :]),
    )
    down8 = torch.cat([first.down8, second.down8])
    down_scale = torch.cat([first.down_scale, second.down_scale], dim=1)

    counters = torch.zeros(2, dtype=torch.int32, device=t_scale.device)

    def fn(values, scale):
        low = lora_gemm.down_projection(values, scale, down8, down_scale, first.dtype)
        x_aug, scale = lora_k_augment.augmented_input(values, scale, low, t_scale, counters, w1)
        return tuple(lora_k_augment.augmented_linear(x_aug, scale, w, None, first.dtype) for w in (w1, w2))

    fn.parts = {"weights": (w1, w2), "t_scale": t_scale, "down8": down8, "down_scale": down_scale}
    return fn


def single_block(tokens: int, inner: int, device, dtype, generator):
    """proj_mlp and to_qkv on one input, proj_out on [attention | GELU(MLP)], then the gated residual."""
    mlp, qkv = (
        Layer(inner, 4 * inner, RANK, device, dtype, generator),
        Layer(inner, 3 * inner, 3 * RANK, device, dtype, generator),
    )
    out = Layer(5 * inner, inner, RANK, device, dtype, generator)
    values, scale = quantize_rowwise_fp8(torch.randn(tokens, inner, device=device, generator=generator))
    values2, scale2 = quantize_rowwise_fp8(torch.randn(tokens, 5 * inner, device=device, generator=generator))
    residual = torch.randn(tokens, inner, device=device, generator=generator).to(dtype)
    gate = torch.randn(1, inner, device=device, generator=generator).to(dtype)
    args = (values, scale, values2, scale2, residual, gate)

    def run(first, second):
        def fn(values, scale, values2, scale2, residual, gate):
            a, b = first(values, scale)
            return a, b, residual + gate * second(values2, scale2)

        return fn

    def now_shared(v, s, triton=False):
        low_mlp, low_qkv = shared_low((mlp, qkv), v, s)
        return mlp.now(v, s, low_mlp, triton), qkv.now(v, s, low_qkv, triton)

    def out_of_place_shared(v, s):
        low_mlp, low_qkv = shared_low((mlp, qkv), v, s)
        return mlp.out_of_place(v, s, low_mlp), qkv.out_of_place(v, s, low_qkv)

    variants = {
        "base": run(lambda v, s: (mlp.base(v, s), qkv.base(v, s)), out.base),
        "before": run(lambda v, s: (mlp.before(v, s), qkv.before(v, s)), out.before),
        "now": run(now_shared, out.now),
        "now_triton": run(lambda v, s: now_shared(v, s, True), out.now_triton),
        "now_unshared": run(lambda v, s: (mlp.now(v, s), qkv.now(v, s)), out.now),
        "now_out_of_place": run(out_of_place_shared, lambda v, s: out.out_of_place(v, s, out.low(v, s))),
        "now_add_in_consumer": run(now_shared, out.add_in_consumer),
        "served": run(lambda v, s: now_shared(v, s, True), out.now),
    }
    for multiple in lora_k_augment.K_MULTIPLES:
        variants[f"k_aug_k{multiple}"] = run(folded_pair(mlp, qkv, multiple), out.now)
    return variants, args, (mlp, qkv, values, scale)


def double_block(tokens: int, inner: int, device, dtype, generator):
    """One stream: to_qkv; to_out (torchao's layer: the hook's side path reads its bf16 input); the MLP in and out."""
    qkv, to_out = (
        Layer(inner, 3 * inner, 3 * RANK, device, dtype, generator),
        Layer(inner, inner, RANK, device, dtype, generator),
    )
    ff0, ff2 = (
        Layer(inner, 4 * inner, RANK, device, dtype, generator),
        Layer(4 * inner, inner, RANK, device, dtype, generator),
    )
    attn = torch.randn(tokens, inner, device=device, generator=generator).to(dtype)
    values, scale = quantize_rowwise_fp8(torch.randn(tokens, inner, device=device, generator=generator))
    values2, scale2 = quantize_rowwise_fp8(torch.randn(tokens, 4 * inner, device=device, generator=generator))
    residual = torch.randn(tokens, inner, device=device, generator=generator).to(dtype)
    gate = torch.randn(1, inner, device=device, generator=generator).to(dtype)
    args = (values, scale, attn, values2, scale2, residual, gate)

    def hook_before(x, out):
        return torch.addmm(out, torch.mm(x, to_out.down.t()), to_out.up.t())

    def hook_now(x, out):
        return out + torch.mm(torch.mm(x, to_out.down.t()), to_out.up.t())

    def run(linear, hook):
        def fn(values, scale, attn, values2, scale2, residual, gate):
            attn8, attn_scale = quantize_rowwise_fp8(attn)
            attn_out = to_out.base(attn8, attn_scale)
            attn_out = attn_out if hook is None else hook(attn, attn_out)
            x = residual + gate * attn_out
            return linear(qkv, values, scale), linear(ff0, values, scale), x + gate * linear(ff2, values2, scale2)

        return fn

    variants = {
        "base": run(Layer.base, None),
        "before": run(Layer.before, hook_before),
        "now": run(Layer.now, hook_now),
        "now_triton": run(Layer.now_triton, hook_now),
        "served": run(lambda layer, v, s: layer.now(v, s, triton=layer is not ff2), hook_now),
    }
    for multiple in lora_k_augment.K_MULTIPLES:
        folded = {qkv: qkv.k_aug(multiple), ff0: ff0.k_aug(multiple)}
        variants[f"k_aug_k{multiple}"] = run(
            lambda layer, v, s, f=folded: f[layer](v, s) if layer in f else layer.now(v, s), hook_now
        )
    return variants, args


CALL = re.compile(r"extern_kernels\.\w+|torch\.ops\.\w+\.\w+|triton_\w+\.run|cpp_fused_\w+\(")


def time_variants(variants: dict, args: tuple, timer) -> dict:
    """ms per call of each compiled variant, and the calls in Inductor's generated code (what it fused)."""
    from torch._inductor.utils import run_and_get_code

    times, calls = {}, {}
    for name, fn in variants.items():
        compiled = torch.compile(fn, fullgraph=True)
        try:
            with torch.inference_mode():
                _, codes = run_and_get_code(compiled, *args)
                found = [m.group(0).removesuffix(".run").removesuffix("(") for c in codes for m in CALL.finditer(c)]
                calls[name] = list(dict.fromkeys(found))
                times[name] = round(timer(lambda c=compiled: c(*args)), 4)
        except Exception as exc:  # one variant failing keeps the others
            calls[name] = f"{type(exc).__name__}: {exc}"[:500]
    base = times.get("base", 0.0)
    side = {k: round(v - base, 4) for k, v in times.items() if k != "base"}
    return {"ms": times, "side_path_ms": side, "generated_calls": calls}


def fold_and_error(mlp, qkv, values, scale, timer) -> dict:
    """Lever b as GEMM times, and h's error with A in e4m3."""
    extended = torch.cat([qkv.weight_t.t(), mlp.down8, qkv.down8]).t()  # to_qkv's weight with the A rows appended
    extended_scale = torch.cat([qkv.weight_scale, mlp.down_scale, qkv.down_scale], dim=1)
    with torch.inference_mode():
        gemm = timer(lambda: qkv.base(values, scale))
        gemm_and_down = timer(lambda: (qkv.base(values, scale), shared_low((mlp, qkv), values, scale)))
        folded = timer(lambda: _smm(values, scale, extended, extended_scale, qkv.dtype))
        exact = (values.float() * scale) @ torch.cat([mlp.down, qkv.down]).float().t()
        fp8_a = torch.cat(shared_low((mlp, qkv), values, scale), dim=1).float()
        bf16_a = (torch.mm(values.to(qkv.dtype), torch.cat([mlp.down, qkv.down]).t()) * scale).float()
    return {
        "to_qkv_gemm_ms": round(gemm, 4),
        "to_qkv_gemm_plus_shared_down_ms": round(gemm_and_down, 4),
        "to_qkv_gemm_with_A_rows_folded_in_ms": round(folded, 4),
        "h_rel_error_A_e4m3": float((fp8_a - exact).norm() / exact.norm()),
        "h_rel_error_A_bf16": float((bf16_a - exact).norm() / exact.norm()),
    }


def folded_accuracy(mlp: Layer, qkv: Layer, values, scale) -> dict:
    """The adapter's delta on one single block's two wide layers, against the exact fp32 (x A^T) B^T on the same FP8
    activations (A in bf16 as the adapter ships it): as served (A in e4m3, bf16 up projection) and folded (t', B' in
    e4m3 too), with the share of t' entries saturated; and whether the folded GEMM with B' = 0 equals the plain GEMM
    bit for bit (what a request at scale 0 would get if it ran the folded GEMM; it does not: it runs the plain one)."""
    result = {}
    x = values.float() * scale
    with torch.inference_mode():
        base = [layer.base(values, scale).float() for layer in (mlp, qkv)]
        exact = [x @ layer.down.float().t() @ layer.up.float().t() for layer in (mlp, qkv)]
        low_mlp, low_qkv = shared_low((mlp, qkv), values, scale)
        served = [mlp.now(values, scale, low_mlp).float(), qkv.now(values, scale, low_qkv).float()]
        result["served_delta_rel_error"] = [rel_error(s - b, e) for s, b, e in zip(served, base, exact, strict=True)]
        fn = folded_pair(mlp, qkv, lora_k_augment.K_MULTIPLES[0])
        folded = [out.float() for out in fn(values, scale)]
        parts = fn.parts
        low = lora_gemm.down_projection(values, scale, parts["down8"], parts["down_scale"], mlp.dtype)
        t = low.float() / scale * parts["t_scale"]
        result["k_aug"] = {
            "delta_rel_error": [rel_error(f - b, e) for f, b, e in zip(folded, base, exact, strict=True)],
            "t_saturated_fraction": lora_k_augment.saturation(low, scale, parts["t_scale"]),
            "t_max_over_448": float(t.abs().max() / 448),
        }
        # The worst-case bound known at switch time (|x8| <= 448: |x8 A_r^T| <= 448 ||A_r||_1) against the product
        # limit 448²: the share of rank columns it would let fold (B' at 448, t' bounded by it).
        feasible = []
        for layer in (mlp, qkv):
            a_l1 = (layer.down8.float() * layer.down_scale.t()).abs().sum(dim=1)
            b_max = (layer.up.float() / layer.weight_scale.view(-1, 1)).abs().amax(dim=0)
            bound = 448 * a_l1 * b_max
            feasible.append(float((bound <= 448**2).float().mean()))
        result["worst_case_bound_would_fold_fraction"] = feasible
        delta_share = [float(e.norm() / b.norm()) for e, b in zip(exact, base, strict=True)]
        result["delta_norm_over_base_norm"] = delta_share
        zero = folded_pair(mlp, qkv, lora_k_augment.K_MULTIPLES[0])
        for weight in zero.parts["weights"]:
            weight.weight[:, values.shape[1] :].zero_()
        result["folded_with_zero_B_equals_plain_gemm"] = [
            bool(torch.equal(z, layer.base(values, scale)))
            for z, layer in zip(zero(values, scale), (mlp, qkv), strict=True)
        ]
    return result


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def up_add_alone(tokens: int, inner: int, device, dtype, generator, timer) -> dict:
    """out += low up^T in place alone, per output width: cuBLAS addmm_ against lora_triton's kernel (GB/s of the
    output's read and write)."""
    from flux_kontext.optimizations.lora_triton import low_rank_add

    result = {}
    for cols, rank in ((3 * inner, 3 * RANK), (4 * inner, RANK), (inner, RANK), (4 * inner, 4 * RANK)):
        out = torch.randn(tokens, cols, device=device, generator=generator).to(dtype)
        low = torch.randn(tokens, rank, device=device, generator=generator).to(dtype)
        up = (torch.randn(cols, rank, device=device, generator=generator) * 0.05).to(dtype)
        row = result[f"{cols}x{rank}"] = {}
        original = out.clone()  # timing adds into ``out`` again and again
        want = low_rank_add(original.clone(), low, up, False).float()
        for name, kernel in (("cublas", False), ("triton", True)):
            try:
                got = low_rank_add(original.clone(), low, up, kernel).float()
                ms = timer(lambda k=kernel, o=out, a=low, b=up: low_rank_add(o, a, b, k))
            except Exception as exc:
                row[name] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            gbs = 2 * out.numel() * out.element_size() / ms / 1e6
            row[name] = {"ms": round(ms, 4), "GB/s": round(gbs), "rel_error": float((got - want).norm() / want.norm())}
    return result


def layer_levers(device, tokens: int = 8704, inner: int = 3072, timer=None) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    single, single_args, fold_inputs = single_block(tokens, inner, device, dtype, generator)
    result = {"tokens": tokens, "rank": RANK, "single_block": time_variants(single, single_args, timer)}
    result["double_block_one_stream"] = time_variants(*double_block(tokens, inner, device, dtype, generator), timer)
    result["fold_A_into_base_gemm"] = fold_and_error(*fold_inputs, timer)
    result["k_aug_accuracy"] = folded_accuracy(*fold_inputs)
    if device.type == "cuda":
        shapes = {(inner, ((4 * inner, RANK), (3 * inner, 3 * RANK))), (inner, ((3 * inner, 3 * RANK),))}
        shapes.add((inner, ((4 * inner, RANK),)))
        result["k_aug_choose"] = lora_k_augment.choose(device, shapes)[1]
    result["up_add_alone"] = up_add_alone(tokens, inner, device, dtype, generator, timer)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main() -> int:
    from bench.common import header, output_path_from_args, time_ms, write_json

    out = output_path_from_args(__doc__)
    result = header()
    result["layers"] = layer_levers(torch.device("cuda"), timer=lambda fn: time_ms(fn, repeats=20, warmup=3))
    write_json(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
