"""GELU + rowwise FP8 quantization in one pass, feeding the FP8 GEMM after the MLP directly.

Where: the single blocks' proj_out input (concat of the attention output, 3,072 wide, and GELU(MLP), 12,288 wide)
and the double blocks' feed-forward output layer input (GELU(MLP), 12,288 wide). torchao quantizes those
activations itself; under compile Inductor fuses GELU, concat, row absmax and cast into a kernel that passes
over each row twice and evaluates the GELU in both passes (the slowest glue kernels in the profile,
bench/cuda_graph_probe.py). Here one Triton program per row loads the row once, keeps it in registers, computes
GELU (sigmoid form, activation.py), the absmax, the scale and the FP8 values, and the block calls
``torch._scaled_mm`` with the layer's FP8 weight as torchao would.

Same arithmetic as torchao's rowwise path: GELU output rounded to bf16 (the unfused path stores it as bf16), scale =
absmax / 448 in fp32 (floored at 1e-12 so a zero row does not divide by zero), values divided by the scale, clamped
to ±448, cast to e4m3. ``reference`` is that arithmetic in plain PyTorch; the GPU check compares the kernel with it.
"""

from __future__ import annotations

import logging
import types

import torch

from flux_kontext.optimizations import OptimizationContext, Report
from flux_kontext.optimizations.activation import tanh_gelu
from flux_kontext.optimizations.quantization import quantize_rowwise_fp8

log = logging.getLogger(__name__)

NAME = "fused_gelu_fp8"
FP8 = torch.float8_e4m3fn


def reference(attn: torch.Tensor | None, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[attn | GELU(mlp)] quantized rowwise to e4m3: (values (..., A+F), scales (..., 1) fp32)."""
    gelu = tanh_gelu(mlp)  # sigmoid form, rounded to mlp's dtype like the unfused path stores it
    return quantize_rowwise_fp8(gelu if attn is None else torch.cat([attn, gelu], dim=-1))


_OP = None  # the registered torch op, built by build_op() at load time (never inside compiled code)
_ACTIVE = True  # False after undo(): the rerouted modules run diffusers' own forward again


def build_op():
    """Build the Triton kernel and register it as a torch op (traceable by torch.compile); GPU only, once."""
    global _OP
    if _OP is not None:
        return _OP
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def gelu_fp8_rowwise_kernel(
        attn_ptr,
        mlp_ptr,
        out_ptr,
        scale_ptr,
        n_attn,
        n_mlp,
        attn_stride,
        mlp_stride,
        out_stride,
        HAS_ATTN: tl.constexpr,
        BLOCK_ATTN: tl.constexpr,
        BLOCK_MLP: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols_m = tl.arange(0, BLOCK_MLP)
        mask_m = cols_m < n_mlp
        m = tl.load(mlp_ptr + row * mlp_stride + cols_m, mask=mask_m, other=0.0).to(tl.float32)
        g = m * tl.sigmoid(2.0 * 0.7978845608028654 * (m + 0.044715 * m * m * m))
        g = g.to(tl.bfloat16).to(tl.float32)
        amax = tl.max(tl.abs(g), axis=0)
        if HAS_ATTN:
            cols_a = tl.arange(0, BLOCK_ATTN)
            mask_a = cols_a < n_attn
            a = tl.load(attn_ptr + row * attn_stride + cols_a, mask=mask_a, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=0))
        scale = tl.maximum(amax, 1e-12) / 448.0
        if HAS_ATTN:
            qa = tl.clamp(a / scale, -448.0, 448.0)
            tl.store(out_ptr + row * out_stride + cols_a, qa.to(tl.float8e4nv), mask=mask_a)
        qg = tl.clamp(g / scale, -448.0, 448.0)
        offset = n_attn if HAS_ATTN else 0
        tl.store(out_ptr + row * out_stride + offset + cols_m, qg.to(tl.float8e4nv), mask=mask_m)
        tl.store(scale_ptr + row, scale)

    @triton_op("flux_kontext::gelu_fp8_rowwise", mutates_args={})
    def gelu_fp8_rowwise(attn: torch.Tensor, mlp: torch.Tensor, has_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n_mlp = mlp.shape[-1]
        n_attn = attn.shape[-1] if has_attn else 0
        rows = mlp.numel() // n_mlp
        mlp2 = mlp.reshape(rows, n_mlp)
        attn2 = attn.reshape(rows, attn.shape[-1]) if has_attn else mlp2
        out = torch.empty((rows, n_attn + n_mlp), dtype=FP8, device=mlp.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=mlp.device)
        wrap_triton(gelu_fp8_rowwise_kernel)[(rows,)](
            attn2,
            mlp2,
            out,
            scale,
            n_attn,
            n_mlp,
            attn2.stride(0),
            mlp2.stride(0),
            out.stride(0),
            HAS_ATTN=has_attn,
            BLOCK_ATTN=triton.next_power_of_2(max(n_attn, 16)),
            BLOCK_MLP=triton.next_power_of_2(n_mlp),
            num_warps=16,
        )
        return out, scale

    _OP = gelu_fp8_rowwise
    return _OP


def quantize(attn: torch.Tensor | None, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel on CUDA (rows flattened), the reference elsewhere; values (rows, A+F), scales (rows, 1)."""
    if not mlp.is_cuda:
        values, scale = reference(attn, mlp)
        return values.reshape(-1, values.shape[-1]), scale.reshape(-1, 1)
    has_attn = attn is not None
    return _OP(attn.contiguous() if has_attn else mlp, mlp.contiguous(), has_attn)


def _expose_fp8_weight(linear: torch.nn.Module) -> bool:
    """Keep plain views of a torchao rowwise FP8 weight (qdata (N, K) e4m3, scale (N, 1)) on the module, so the
    compiled forward sees ordinary tensors; False when the layer is not quantized that way."""
    weight = getattr(linear, "weight", None)
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if qdata is None or scale is None or qdata.dtype != FP8 or tuple(scale.shape) != (qdata.shape[0], 1):
        return False
    # Buffers (not saved): plain tensors sharing torchao's storage; no copy.
    linear.register_buffer("fp8_weight_t", qdata.t(), persistent=False)  # (K, N) column-major, as _scaled_mm takes
    linear.register_buffer("fp8_weight_scale", scale.t(), persistent=False)  # (1, N)
    return True


def fp8_linear(values: torch.Tensor, scale: torch.Tensor, linear: torch.nn.Module, out_dtype) -> torch.Tensor:
    """``linear`` on activations already quantized rowwise: cuBLAS FP8 GEMM with both scales, bias fused."""
    return torch._scaled_mm(
        values,
        linear.fp8_weight_t,
        scale_a=scale,
        scale_b=linear.fp8_weight_scale,
        bias=linear.bias,
        out_dtype=out_dtype,
        use_fast_accum=True,
    )


def single_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, **kwargs):
    """FluxSingleTransformerBlock.forward with proj_out's input quantized by the fused kernel."""
    if not _ACTIVE:
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, **kwargs)
    if kwargs.get("joint_attention_kwargs"):
        raise ValueError("joint_attention_kwargs are not supported by the fused FP8 single block")
    text_tokens = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    normed, gate = block.norm(hidden_states, emb=temb)
    mlp = block.proj_mlp(normed)
    attn = block.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb)
    values, scale = quantize(attn, mlp)
    out = fp8_linear(values, scale, block.proj_out, residual.dtype).reshape(residual.shape)
    hidden_states = residual + gate.unsqueeze(1) * out
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


def feed_forward(ff, hidden_states):
    """diffusers FeedForward (GELU-tanh projection, dropout, output linear) with the fused quantization."""
    if not _ACTIVE:
        return type(ff).forward(ff, hidden_states)
    mlp = ff.net[0].proj(hidden_states)
    values, scale = quantize(None, mlp)
    return fp8_linear(values, scale, ff.net[2], hidden_states.dtype).reshape(*hidden_states.shape[:-1], -1)


def replace(transformer) -> int:
    """Route every eligible MLP through the fused path; returns how many (single blocks + feed-forwards)."""
    count = 0
    for block in transformer.single_transformer_blocks:
        if block.proj_out.in_features > block.proj_mlp.out_features and _expose_fp8_weight(block.proj_out):
            block.forward = types.MethodType(single_block_forward, block)
            count += 1
    for block in transformer.transformer_blocks:
        for ff in (block.ff, block.ff_context):
            if getattr(ff.net[0], "approximate", None) == "tanh" and _expose_fp8_weight(ff.net[2]):
                ff.forward = types.MethodType(feed_forward, ff)
                count += 1
    return count


def undo() -> None:
    """Send every rerouted module back to diffusers' forward (what wraps it, compile and graphs, stays in place)."""
    global _ACTIVE
    _ACTIVE = False


def apply(pipe, context: OptimizationContext) -> Report:
    settings = context.settings
    if context.device_type != "cuda":
        return Report(NAME, "skipped", "a Triton kernel for the GPU's FP8 path")
    if not settings.fused_gelu_fp8:
        return Report(NAME, "skipped", "FLUX_FUSED_GELU_FP8=false")
    global _ACTIVE
    build_op()
    _ACTIVE = True
    count = replace(pipe.transformer)
    if count == 0:
        return Report(NAME, "skipped", "no rowwise-FP8 MLP output layer to feed (FP8 not applied)")
    return Report(
        NAME,
        "applied",
        f"{count} MLP outputs: GELU and rowwise FP8 quantization in one pass per row (Triton), straight into the "
        "FP8 GEMM",
        undo=undo,
    )
