"""K-augmentation: the LoRA side path's up projection folded into the base FP8 GEMM by widening its K by the slots'
rank, so the wide outputs (q|k|v, the MLP's input projection) are written once, by the GEMM, instead of being read and
written again by an in-place up projection (lora_gemm.py, lora_triton.py). On by default (FLUX_LORA_K_AUGMENT).

With the block's rowwise FP8 activations x = sx[m] * x8 and the layer's rowwise FP8 weight W = sw[n] * W8:

    y = sx[m] * sw[n] * ( x8 @ W8^T  +  t' @ B'^T ),   x_aug = [x8 | t' | 0] (M, K+R+pad), W_aug = [W8 | B' | 0]

    t'[m, r] = e4m3( (x8 @ A^T)[m, r] / c_r )          (the down projection from the FP8 activations, as now)
    B'[n, r] = e4m3( c_r * (scale * B)[n, r] / sw[n] )  (written at switch time)

so sx * sw * t' B'^T = scale * x A^T B^T. One free factor c_r per rank column splits the product's magnitude between
the two e4m3 factors; t' depends on the request's activations, B' is known at switch time, so c_r puts B''s largest
entry at 448 (the largest c_r there is: t' as small as it can be; e4m3's precision is the same across its normal
range, so that costs B' nothing measurable). Whatever c_r, one rank's term t' * B' can hold at most 448² (the
largest single term of the base GEMM's sum): a strong adapter or a high scale would saturate t'. Two things make
that rare and harmless. Where x_aug's chosen width has spare zero columns (the padding to a fast K multiple), t' is
written in ``copies`` of t / copies (B' in each: the same sum), up to MAX_COPIES times the room, in columns the GEMM
reads anyway. Beyond that, lora_fold_input.py's guard rescales a row whose t' would not fit by a power of two (its
x8 divided, its row scale multiplied: the same product), in the kernel that writes t'; rows that fit pay nothing
more, and what still cannot fit is clamped and counted (/health, per adapter).

No copy of the activations: the block's quantization kernel (kernels.ln_mod_fp8 or kernels.gelu_fp8 with ``extra``
columns) writes x8 straight into x_aug's first K columns, the down projection reads them in place (a strided view),
and the t' kernel writes the last columns (``input_columns`` tells the block how many). Where the block's input
comes without those columns (another producer), x_aug is assembled by a copy instead (``augmented_input``).

W_aug is laid out once at stack apply (a copy of the base FP8 weight with R + pad more columns, zero; the base weight
itself is never re-quantized and the layer without adapters keeps its own GEMM); a switch writes B' into W_aug's
rank columns in place: the same storage, so compiled code and CUDA graphs see nothing new. Layers that read one
input (a single block's proj_mlp and to_qkv) share x_aug: both layers' t' columns, each W_aug holding zeros in the
other's.

What it costs: x_aug's t' columns (a small write) and the GEMM's larger K; what it saves: the in-place up
projection's two passes over the bf16 output (M*N*4 bytes) and a launch. Both depend on the shape (q|k|v and MLP in
read K = 3072 and write 9216 / 12288 columns; proj_out and MLP out read 15360 / 12288 and write 3072), so whether
to fold each layer shape, and x_aug's width (cuBLAS's FP8 GEMM needs K+R a multiple of 16; some multiples run
faster), is measured at start (``choose``); what is not folded keeps lora_gemm.py's in-place path.

Accuracy: t' and B' each carry e4m3's rounding (like A already does), so the adapter's delta carries about three
FP8-sized errors instead of one; BENCHMARKS.md ("LoRA adapters") has the measured delta error against the exact one.
"""

from __future__ import annotations

import torch

from flux_kontext.optimizations.kernels.e4m3 import E4M3_MAX, FP8
from flux_kontext.optimizations.lora_fold_input import fold_input

# At most this many copies of t' (each t' / copies) where x_aug's padding leaves room for them: 8 gives t' 2^3 more
# room (the bench's random adapter, about 10% of each layer's output, needs 2^1-2^2 at B' = 448) while t' / 8 keeps
# e4m3's normal range for all but its smallest entries.
MAX_COPIES = 8
# x_aug's width (K + R, then zero-weight padding columns) rounded up to one of these; which one (and whether to fold
# at all) is measured per layer shape at start on the GPU (``choose``). cuBLAS's FP8 GEMM needs 16.
K_MULTIPLES = (16, 64, 128, 256)


def copies_of(extra: int, pad: int) -> int:
    """How many copies of the ``extra`` t' columns fit in extra + pad columns (at most MAX_COPIES)."""
    return max(1, min(MAX_COPIES, (extra + pad) // extra)) if extra else 1


def padding(fan_in: int, extra: int, multiple: int) -> int:
    """Zero-weight columns after the t' columns that make x_aug's width a multiple of ``multiple``."""
    width = fan_in + extra
    return -width % multiple


class AugmentedWeight:
    """One layer's W_aug = [W8 | B' ... | 0] (N, K + extra + pad) in e4m3, its B' in ``columns`` of each of the
    ``copies`` blocks of ``extra`` columns (the rest zero: another layer's t' on a shared input, and the padding)."""

    def __init__(
        self, weight_t: torch.Tensor, weight_scale: torch.Tensor, extra: int, start: int, width: int, pad: int = 0
    ):
        fan_in, fan_out = weight_t.shape  # weight_t: (K, N), the column-major view _scaled_mm takes
        self.fan_in = fan_in
        self.weight = torch.zeros(fan_out, fan_in + extra + pad, dtype=FP8, device=weight_t.device)
        self.weight[:, :fan_in].copy_(weight_t.t())
        self.weight_t = self.weight.t()
        self.weight_scale = weight_scale  # (1, N): the base layer's, shared
        self.copies = copies_of(extra, pad)
        first = fan_in + start
        self.columns = [slice(first + c * extra, first + c * extra + width) for c in range(self.copies)]

    @property
    def input_width(self) -> int:
        """x_aug's width: K + every t' column of the input + padding."""
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @torch.no_grad()
    def fill(self, up: torch.Tensor, t_scale: torch.Tensor) -> None:
        """B' from ``up`` (N, width: scale * B, the slots' bf16 up projection) into each copy's columns of W_aug, and
        each column's t' = x8 A^T * t_scale factor (1 / (c_r · copies)) into ``t_scale`` (1, width); zero columns
        stay zero."""
        raw = up.float() / self.weight_scale.view(-1, 1)
        top = raw.abs().amax(dim=0)
        factor = torch.where(top > 0, E4M3_MAX / top.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        b8 = (raw * factor).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
        for columns in self.columns:
            self.weight[:, columns].copy_(b8)
        t_scale.copy_((top / (E4M3_MAX * self.copies)).view(1, -1))


def fold_into(x_aug, scale, low, t_scale, counters, fan_in: int, copies: int) -> torch.Tensor:
    """x_aug's t' columns (``copies`` times, then zero padding) from the down projection ``low`` = x A^T (M, R), in
    place; rows whose t' would not fit e4m3 rescaled in place (x_aug's x8 and ``scale``): lora_fold_input.py.
    Returns x_aug."""
    fold_input(x_aug, scale, low, t_scale, counters, fan_in, copies)
    return x_aug


def augmented_input(values, scale, low, t_scale, counters, weight: AugmentedWeight):
    """x_aug (M, ``weight``'s input width) assembled by a copy of x8 ``values`` (M, K), where the block's kernel did
    not leave the columns; with its own row scales (the guard may rescale rows): (x_aug, scale)."""
    fan_in, copies = values.shape[1], weight.copies
    x_aug = values.new_empty(values.shape[0], weight.input_width)
    x_aug[:, :fan_in].copy_(values)
    scale = scale.clone()
    return fold_into(x_aug, scale, low, t_scale, counters, fan_in, copies), scale


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
    """Fraction of t' entries beyond e4m3's range before the guard (the rows it rescales); for benchmarks and
    checks."""
    t = low.float() / scale * t_scale
    return float((t.abs() > E4M3_MAX).float().mean())


def choose(device: torch.device, inputs: set[tuple[int, tuple[tuple[int, int], ...]]], rows: int = 4608):
    """{input: pad columns, or None to keep the in-place up projection}, and the measurements. An input is
    (in_features, ((out_features, rank columns) of each layer reading it)). On the GPU both ways are timed at
    ``rows`` tokens: the base GEMMs plus the in-place up projections (the faster of lora_triton's kernel and cuBLAS)
    against x_aug's t' columns' write (the block's kernel writes x8 into x_aug anyway) plus the widened GEMMs, for
    each K multiple; the fastest wins. Elsewhere (CPU): fold,
    padded to 16."""
    if device.type != "cuda":
        chosen = {key: padding(key[0], sum(r for _, r in key[1]), K_MULTIPLES[0]) for key in inputs}
        return chosen, {"why": "not a CUDA device: folded, K padded to 16"}
    chosen, data = {}, {}
    for key in sorted(inputs):
        try:
            row = _measure(device, rows, *key)
        except Exception as exc:  # a GEMM shape cuBLAS refuses here: keep the in-place path, and say why
            chosen[key], data[label(key)] = None, f"{type(exc).__name__}: {exc}"[:300]
            continue
        extra = sum(r for _, r in key[1])
        fold_k = _widest_within_noise(row["fold_ms"], key[0], extra)
        chosen[key] = fold_k - key[0] - extra if min(row["fold_ms"].values()) < row["in_place_ms"] else None
        data[label(key)] = {**row, "chosen": f"fold, K={fold_k}" if chosen[key] is not None else "in place"}
    return chosen, {"rows": rows, "by_input": data}


# Widths whose measured time is within this fraction of the fastest are as fast (the start-up timings of one shape
# differ by a few percent from one start to the next): among them, the one with the most t' copies is chosen, since
# the guard's rescaling (not in the timing: its t' fits) costs more than the difference (BENCHMARKS.md, LoRA).
WIDTH_NOISE = 0.03


def _widest_within_noise(fold_ms: dict[int, float], fan_in: int, extra: int) -> int:
    """The x_aug width to fold at: the most t' copies among the widths timed within WIDTH_NOISE of the fastest (the
    fastest where copies tie)."""
    fastest = min(fold_ms.values())
    near = [width for width, ms in fold_ms.items() if ms <= fastest * (1 + WIDTH_NOISE)]
    return max(near, key=lambda width: (copies_of(extra, width - fan_in - extra), -fold_ms[width]))


def label(key) -> str:
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
    counters = torch.zeros(2, dtype=torch.int32, device=device)
    fold_ms = {}
    for multiple in K_MULTIPLES:
        width = fan_in + extra + padding(fan_in, extra, multiple)
        if width in fold_ms:
            continue
        wide_weights = []
        for w, w_scale in weights:
            wide_weight = torch.zeros(w.shape[0], width, dtype=w.dtype, device=device)
            wide_weight[:, :fan_in].copy_(w)
            wide_weights.append((wide_weight, w_scale))
        x_aug = torch.zeros(rows, width, dtype=FP8, device=device)
        x_aug[:, :fan_in].copy_(values)  # as the block's kernel leaves it

        copies = copies_of(extra, width - fan_in - extra)

        def fold(x_aug=x_aug, wide_weights=wide_weights, copies=copies):
            fold_into(x_aug, scale.clone(), low, t_scale / copies, counters, fan_in, copies)
            for w, w_scale in wide_weights:
                gemm(x_aug, w, w_scale)

        fold_ms[width] = round(gpu_milliseconds(fold), 4)
    return {"in_place_ms": round(in_place_ms, 4), "fold_ms": fold_ms}
