"""K-augmentation: the LoRA side path's up projection folded into the base FP8 GEMM by widening its K by the slots'
rank, so the wide outputs (q|k|v, the MLP's input projection) are written once, by the GEMM, instead of being read and
written again by an in-place up projection (lora_gemm.py, lora_triton.py).

With the block's rowwise FP8 activations x = sx[m] * x8 and the layer's rowwise FP8 weight W = sw[n] * W8:

    y = sx[m] * sw[n] * ( x8 @ W8^T  +  t' @ B'^T ),   x_aug = [x8 | t'] (M, K+R),   W_aug = [W8 | B'] (N, K+R)

    t'[m, r] = e4m3( (x8 @ A^T)[m, r] / c_r )          (the down projection from the FP8 activations, as now)
    B'[n, r] = e4m3( c_r * (scale * B)[n, r] / sw[n] )  (written at switch time)

so sx * sw * t' B'^T = scale * x A^T B^T. One free factor c_r per rank column decides how the product's magnitude is
split between the two e4m3 factors. B' is known at switch time, x8 @ A^T is not (it depends on the request's
activations), so c_r puts B''s largest entry at e4m3's largest value (448): that leaves t' all the headroom there is.

The limit: whatever c_r, one rank's term t'[m, r] * B'[n, r] can hold at most 448², the largest single term of the
base GEMM's own sum; a stronger adapter saturates t' (clamped at 448: the delta of those rows is cut, ``saturation``
counts it). Each t' column is therefore written COPIES times (t' / COPIES, B' repeated), which raises the limit to
COPIES * 448² for COPIES * R more K. A worst-case bound on t' known at switch time (|x8| <= 448, so
|x8 A_r^T| <= 448 * ||A_r||_1) is useless here: it would refuse any realistic adapter. Since the limit depends on the
request's activations, the fold is off by default (FLUX_LORA_K_AUGMENT): BENCHMARKS.md has what it saves and how often
the bench's adapter saturates.

W_aug is laid out once at stack apply (a copy of the base FP8 weight with R more zero columns; the base weight itself
is never re-quantized and the layer without adapters keeps its own GEMM); a switch writes B' into W_aug's last R
columns in place: the same storage, so compiled code and CUDA graphs see nothing new. Layers that read one input (a
single block's proj_mlp and to_qkv) share x_aug: both layers' t' columns, each W_aug holding zeros in the other's.

Only where the output is wide: x_aug costs one more write and read of the FP8 activations (M*K bytes), the in-place
up projection it replaces two passes over the bf16 output (M*N*4 bytes); the output projections (N = K) and MLP-down
(N = K/5) keep lora_gemm.py's path. cuBLAS's FP8 GEMM needs K+R a multiple of 16.

Accuracy: t' and B' each carry e4m3's rounding (like A already does), so the adapter's delta carries about three
FP8-sized errors instead of one; BENCHMARKS.md ("LoRA adapters") has the measured delta error against the exact one.
"""

from __future__ import annotations

import torch

from flux_kontext.optimizations.kernels.e4m3 import E4M3_MAX, FP8

# Candidates for folding: out_features >= this many times in_features (q|k|v: 3, MLP in: 4; the output projections
# 1, MLP down 0.2 keep the in-place up projection: the output they would spare is narrower than x_aug).
WIDTH_RATIO = 2
# Each t' column written this many times (t' / COPIES in each, B' repeated): the largest rank term the GEMM can hold
# grows from 448² to COPIES * 448² (the headroom the bench's adapter needs: BENCHMARKS.md), for COPIES * R more K.
COPIES = 2
# x_aug's width (K + COPIES * R, then zero-weight padding columns) rounded up to one of these; which one (and whether
# to fold at all) is measured per layer shape at start on the GPU (``choose``). cuBLAS's FP8 GEMM needs 16.
K_MULTIPLES = (16, 64, 128, 256)


def wide(linear) -> bool:
    """Whether folding ``linear``'s up projection into its GEMM can pay (its output is much wider than its input)."""
    return linear.out_features >= WIDTH_RATIO * linear.in_features


def padding(fan_in: int, extra: int, multiple: int) -> int:
    """Zero-weight columns after the t' copies that make x_aug's width a multiple of ``multiple``."""
    width = fan_in + COPIES * extra
    return -width % multiple


class AugmentedWeight:
    """One layer's W_aug = [W8 | B' | B' ... | 0] (N, K + COPIES * extra + pad) in e4m3, its B' in ``columns`` of each
    copy (the rest of the extra columns zero: another layer's t' on a shared input, and the padding)."""

    def __init__(
        self, weight_t: torch.Tensor, weight_scale: torch.Tensor, extra: int, start: int, width: int, pad: int = 0
    ):
        fan_in, fan_out = weight_t.shape  # weight_t: (K, N), the column-major view _scaled_mm takes
        self.weight = torch.zeros(fan_out, fan_in + COPIES * extra + pad, dtype=FP8, device=weight_t.device)
        self.weight[:, :fan_in].copy_(weight_t.t())
        self.weight_t = self.weight.t()
        self.weight_scale = weight_scale  # (1, N): the base layer's, shared
        first = fan_in + start
        self.columns = [slice(first + c * extra, first + c * extra + width) for c in range(COPIES)]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @torch.no_grad()
    def fill(self, up: torch.Tensor, t_scale: torch.Tensor) -> None:
        """B' from ``up`` (N, width: scale * B, the slots' bf16 up projection) into W_aug, and each column's
        t' = x8 A^T * t_scale factor (1 / c_r) into ``t_scale`` (1, width); zero columns stay zero."""
        raw = up.float() / self.weight_scale.view(-1, 1)
        top = raw.abs().amax(dim=0)
        factor = torch.where(top > 0, E4M3_MAX / top.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        values = (raw * factor).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
        for columns in self.columns:
            self.weight[:, columns].copy_(values)
        t_scale.copy_((top / (E4M3_MAX * COPIES)).view(1, -1))


def low_rank_columns(low: torch.Tensor, scale: torch.Tensor, t_scale: torch.Tensor) -> torch.Tensor:
    """t' in e4m3 from the down projection ``low`` = x A^T (M, R) of rowwise activations x = x8 * scale: x8 A^T
    times each column's factor (1 / (c_r * COPIES)), saturated at e4m3's largest value."""
    return (low.float() / scale * t_scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def augmented_input(values, scale, low, t_scale, pad: int = 0) -> torch.Tensor:
    """x_aug = [x8 | t' | t' ... | pad columns] (M, K + COPIES * R + pad), contiguous (one pointwise kernel under
    compile). The padding repeats t' columns (finite values against W_aug's zero columns: they add exactly 0)."""
    columns = low_rank_columns(low, scale, t_scale)
    repeats = COPIES + -(-pad // columns.shape[1])
    tail = torch.cat([columns] * repeats, dim=1)[:, : COPIES * columns.shape[1] + pad]
    return torch.cat([values, tail], dim=1)


def augmented_linear(x_aug: torch.Tensor, scale: torch.Tensor, weight: AugmentedWeight, bias, out_dtype):
    """The layer's FP8 GEMM on x_aug and W_aug: base output plus the adapters' delta, written once."""
    return torch._scaled_mm(
        x_aug,
        weight.weight_t,
        scale_a=scale,
        scale_b=weight.weight_scale,
        bias=bias,
        out_dtype=out_dtype,
        use_fast_accum=True,
    )


def saturation(low: torch.Tensor, scale: torch.Tensor, t_scale: torch.Tensor) -> float:
    """Fraction of t' entries clamped at 448 (the adapter's delta saturated there); for benchmarks and checks."""
    t = low.float() / scale * t_scale
    return float((t.abs() > E4M3_MAX).float().mean())


def choose(device: torch.device, inputs: set[tuple[int, tuple[tuple[int, int], ...]]], rows: int = 4608):
    """{input: pad columns, or None to keep the in-place up projection}, and the measurements. An input is
    (in_features, ((out_features, rank columns) of each layer reading it)). On the GPU both ways are timed at
    ``rows`` tokens: the base GEMMs plus the in-place up projections (the faster of lora_triton's kernel and cuBLAS)
    against x_aug's write plus the widened GEMMs, for each K multiple; the fastest wins. Elsewhere (CPU): fold,
    padded to 16."""
    if device.type != "cuda":
        chosen = {key: padding(key[0], sum(r for _, r in key[1]), K_MULTIPLES[0]) for key in inputs}
        return chosen, {"why": "not a CUDA device: folded, K padded to 16"}
    chosen, data = {}, {}
    for key in sorted(inputs):
        try:
            row = _measure(device, rows, *key)
        except Exception as exc:  # a GEMM shape cuBLAS refuses here: keep the in-place path, and say why
            chosen[key], data[_label(key)] = None, f"{type(exc).__name__}: {exc}"[:300]
            continue
        fold_k, fold_ms = min(row["fold_ms"].items(), key=lambda item: item[1])
        chosen[key] = fold_k - key[0] - COPIES * sum(r for _, r in key[1]) if fold_ms < row["in_place_ms"] else None
        data[_label(key)] = {**row, "chosen": f"fold, K={fold_k}" if chosen[key] is not None else "in place"}
    return chosen, {"rows": rows, "by_input": data}


def _label(key) -> str:
    fan_in, layers = key
    return f"K{fan_in}:" + "+".join(f"{n}x{r}" for n, r in layers)


def _measure(device, rows: int, fan_in: int, layers) -> dict:
    from flux_kontext.gpu_timing import gpu_milliseconds
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8
    from flux_kontext.optimizations.lora_triton import low_rank_add

    generator = torch.Generator(device=device).manual_seed(0)
    values, scale = quantize_rowwise_fp8(torch.randn(rows, fan_in, device=device, generator=generator))
    weights = [quantize_rowwise_fp8(torch.randn(n, fan_in, device=device, generator=generator)) for n, _ in layers]
    extra = sum(r for _, r in layers)
    low = torch.randn(rows, extra, device=device, generator=generator).to(torch.bfloat16)
    ups = [torch.randn(n, r, device=device, generator=generator).to(torch.bfloat16) * 0.01 for n, r in layers]
    lows = low.split([r for _, r in layers], dim=1)

    def gemm(x, w, w_scale):
        return torch._scaled_mm(x, w.t(), scale_a=scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)

    def in_place(kernel: bool):
        for (w, w_scale), part, up in zip(weights, lows, ups, strict=True):
            low_rank_add(gemm(values, w, w_scale), part, up, kernel)

    in_place_ms = min(gpu_milliseconds(lambda k=kernel: in_place(k)) for kernel in (True, False))
    t_scale = torch.full((1, extra), 1e-3, device=device)
    fold_ms = {}
    for multiple in K_MULTIPLES:
        pad = padding(fan_in, extra, multiple)
        width = fan_in + COPIES * extra + pad
        if width in fold_ms:
            continue
        wide_weights = []
        for w, w_scale in weights:
            wide_weight = torch.zeros(w.shape[0], width, dtype=w.dtype, device=device)
            wide_weight[:, :fan_in].copy_(w)
            wide_weights.append((wide_weight, w_scale))
        # x_aug's t' columns are tiny (M x R) and fused into its write under compile: timed as the one copy
        tail = augmented_input(values, scale, low, t_scale, pad)[:, fan_in:].contiguous()

        def fold(tail=tail, wide_weights=wide_weights):
            x_aug = torch.cat([values, tail], dim=1)
            for w, w_scale in wide_weights:
                gemm(x_aug, w, w_scale)

        fold_ms[width] = round(gpu_milliseconds(fold), 4)
    return {"in_place_ms": round(in_place_ms, 4), "fold_ms": fold_ms}
