"""The LoRA side path's arithmetic next to the fused FP8 blocks' GEMMs (fp8_blocks.fp8_linear), laid out for memory
traffic: the side path does about 1% of its layer's FLOPs, but done plainly it moves about as many bytes as the layer.

- Down projection straight from the FP8 activations the block quantized for its base GEMM: A in e4m3 with one fp32
  scale per rank row, one cuBLAS ``_scaled_mm`` (M x K x R) with the activations' row scales: the activations are
  read once at one byte per element (no bf16 copy written and read back). A's rounding adds an error of FP8's size
  to the adapter's small contribution (BENCHMARKS.md, "LoRA adapters").
- One down projection per shared input: a single block's proj_mlp and to_qkv read the same quantized activations;
  their A rows lie in one buffer (lora_side.SharedInput), one GEMM gives both layers' low-rank activations.
- The up projection added in place to the base GEMM's output (one read and one write of the output: a Triton
  kernel, lora_triton.py, or cuBLAS with beta = 1, whichever measured faster at start). An out-of-place ``addmm``
  (what Inductor emits for ``out + h B^T``: ``at::addmm_out``) first copies the output into a new buffer, then reads
  and writes it again. The base GEMM and the in-place add are one custom op, so Inductor sees one opaque call that
  produces the output, and nothing it could turn back into a copy.
"""

from typing import Optional

import torch

from flux_kontext.optimizations.lora_triton import low_rank_add


@torch.library.custom_op("flux_kontext::fp8_linear_low_rank", mutates_args=())
def fp8_linear_low_rank(
    values: torch.Tensor,
    scale: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library's schema inference reads typing.Optional)
    low: torch.Tensor,
    up: torch.Tensor,
    out_dtype: torch.dtype,
    triton_up: bool,
) -> torch.Tensor:
    """(values * scale) W^T + bias + low up^T: the rowwise FP8 GEMM as fp8_blocks.fp8_linear calls it, then the up
    projection added into its output in place (lora_triton.py's kernel when ``triton_up``, else cuBLAS)."""
    out = torch._scaled_mm(
        values, weight_t, scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype, use_fast_accum=True
    )
    return low_rank_add(out, low, up, triton_up)


@fp8_linear_low_rank.register_fake
def _(values, scale, weight_t, weight_scale, bias, low, up, out_dtype, triton_up):
    return values.new_empty((values.shape[0], weight_t.shape[1]), dtype=out_dtype)


def down_projection(values: torch.Tensor, scale: torch.Tensor, down8: torch.Tensor, down_scale: torch.Tensor, dtype):
    """x A^T from rowwise-quantized activations (values * scale = x) and A in e4m3 (down8 * down_scale^T = A):
    (M, R). Memory-bound, so exact accumulation costs nothing here."""
    return torch._scaled_mm(values, down8.t(), scale_a=scale, scale_b=down_scale, out_dtype=dtype)


# ----- A's rows appended to the base weight (the layers whose up projection stays in place) ---------------------------
# The separate down projection x8 A^T (M x K x R, R = 16-64) runs on cuBLAS at a fraction of the bandwidth (it tiles
# N = R into one 128-wide tile: 36 CTAs at 4608 rows, each looping over all of K; BENCHMARKS.md, "The fold on by
# default"), and on proj_out / MLP out it re-reads 15,360- / 12,288-wide activations. With A's e4m3 rows appended to
# the layer's FP8 weight, one GEMM writes [y | x A^T] (N + R columns): the activations are read once, for R more
# output columns. Whether that is faster is measured per layer shape at start (``choose_rows``).


class RowWeight:
    """[W8; A8] (N + R, K) in e4m3 with its column scales [sw | A's row scales] and bias [b | 0]; the side path's
    ``down8`` / ``down_scale`` become views of its last R rows / scales, so a switch's re-quantization of A writes
    straight into it."""

    def __init__(self, weight_t: torch.Tensor, weight_scale: torch.Tensor, bias, rank: int):
        fan_in, fan_out = weight_t.shape
        self.fan_out = fan_out
        self.weight = torch.zeros(fan_out + rank, fan_in, dtype=weight_t.dtype, device=weight_t.device)
        self.weight[:fan_out].copy_(weight_t.t())
        self.weight_t = self.weight.t()
        self.scale = torch.ones(1, fan_out + rank, dtype=torch.float32, device=weight_t.device)
        self.scale[:, :fan_out].copy_(weight_scale)
        self.bias = None
        if bias is not None:
            self.bias = torch.zeros(fan_out + rank, dtype=bias.dtype, device=bias.device)
            self.bias[:fan_out].copy_(bias)
        self.down8, self.down_scale = self.weight[fan_out:], self.scale[:, fan_out:]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@torch.library.custom_op("flux_kontext::fp8_linear_rows_low_rank", mutates_args=())
def fp8_linear_rows_low_rank(
    values: torch.Tensor,
    scale: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library's schema inference reads typing.Optional)
    up: torch.Tensor,
    fan_out: int,
    out_dtype: torch.dtype,
    triton_up: bool,
) -> torch.Tensor:
    """[y | x A^T] = (values * scale) [W; A]^T + [b | 0] in one FP8 GEMM (M, N + R), then y += (x A^T) up^T in place;
    the caller takes the first N columns (a strided view: the residual reads it as it is)."""
    out = torch._scaled_mm(
        values, weight_t, scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype, use_fast_accum=True
    )
    low = out[:, fan_out:].contiguous()  # M x R: small; its own storage, apart from the output it is added into
    low_rank_add(out[:, :fan_out], low, up, triton_up)
    return out


@fp8_linear_rows_low_rank.register_fake
def _(values, scale, weight_t, weight_scale, bias, up, fan_out, out_dtype, triton_up):
    return values.new_empty((values.shape[0], weight_t.shape[1]), dtype=out_dtype)


def rows_linear(values, scale, rows: RowWeight, up, out_dtype, triton_up: bool) -> torch.Tensor:
    """The layer's output with the side path added, from the one GEMM on [W8; A8]: (M, N), a view."""
    out = fp8_linear_rows_low_rank(
        values, scale, rows.weight_t, rows.scale, rows.bias, up, rows.fan_out, out_dtype, triton_up
    )
    return out[:, : rows.fan_out]


def choose_rows(device: torch.device, shapes: set[tuple[int, int, int]], rows: int = 4608) -> tuple[dict, dict]:
    """({(in, out, rank): append A's rows}, the measurements): the base GEMM + the separate down projection against the
    GEMM on [W8; A8], at ``rows`` tokens (the in-place up projection is the same either way and left out); the
    appended rows where faster and within FP8 GEMM noise of the separate one. Elsewhere (CPU): appended."""
    if device.type != "cuda":
        return dict.fromkeys(shapes, True), {"why": "not a CUDA device: A's rows appended"}
    use, data = {}, {}
    for shape in sorted(shapes):
        try:
            row = _measure_rows(device, rows, *shape)
        except Exception as exc:  # a shape cuBLAS refuses here: the separate down projection, and why
            use[shape], data["x".join(map(str, shape))] = False, f"{type(exc).__name__}: {exc}"[:300]
            continue
        use[shape] = row["rows_ms"] < row["separate_ms"] and row["low_rel_error"] < 0.01
        data["x".join(map(str, shape))] = {**row, "chosen": "rows appended" if use[shape] else "separate"}
    return use, {"rows": rows, "by_layer_shape": data}


def _measure_rows(device, rows: int, fan_in: int, fan_out: int, rank: int) -> dict:
    from flux_kontext.gpu_timing import gpu_milliseconds
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8

    generator = torch.Generator(device=device).manual_seed(0)
    values, scale = quantize_rowwise_fp8(torch.randn(rows, fan_in, device=device, generator=generator))
    weight8, weight_scale = quantize_rowwise_fp8(torch.randn(fan_out, fan_in, device=device, generator=generator))
    down8, down_scale = quantize_rowwise_fp8(torch.randn(rank, fan_in, device=device, generator=generator))
    weight_t, weight_scale, down_scale = weight8.t(), weight_scale.t(), down_scale.t()
    combined = RowWeight(weight_t, weight_scale, None, rank)
    combined.down8.copy_(down8)
    combined.down_scale.copy_(down_scale)

    def gemm(w_t, w_scale):
        return torch._scaled_mm(
            values, w_t, scale_a=scale, scale_b=w_scale, out_dtype=torch.bfloat16, use_fast_accum=True
        )

    def separate():
        return gemm(weight_t, weight_scale), down_projection(values, scale, down8, down_scale, torch.bfloat16)

    def appended():
        return gemm(combined.weight_t, combined.scale)

    low, both = separate()[1], appended()[:, fan_out:]
    error = float((both.float() - low.float()).norm() / low.float().norm())
    return {
        "separate_ms": round(gpu_milliseconds(separate), 4),
        "rows_ms": round(gpu_milliseconds(appended), 4),
        "low_rel_error": error,
    }
