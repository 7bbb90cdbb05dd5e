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
