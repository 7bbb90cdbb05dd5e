"""The forwards of FP8 blocks fed by our Triton kernels (flux_kontext.optimizations.kernels) instead of torchao's
per-layer activation quantization; fused_gelu_fp8 and fused_norm_rope put them in the blocks' ``body`` slot.

- MLP outputs (fused_gelu_fp8): the single blocks' proj_out input (attention output | GELU(MLP)) and the double
  blocks' ff.net[2] input (GELU(MLP)) are quantized in one kernel, and the block calls ``torch._scaled_mm``
  with the layer's FP8 weight as torchao would. Under compile Inductor evaluated the GELU in both of its passes over
  each row: the slowest glue kernel in the profile (bench/cuda_graph_probe.py).
- Whole blocks (fused_norm_rope): before the QKV and MLP GEMMs, LayerNorm + modulation + quantization in one pass
  (reading the single blocks' text and image rows where they lie: no concatenation written); after the QKV GEMM,
  RMSNorm + RoPE on q/k with q, k, v written in the attention kernel's layout. The forward is then ours, with
  diffusers' arithmetic (checked against diffusers' forward in tests/test_fused_fp8.py) and the attention kernel
  chosen by the attention optimization.

A block is rerouted only when every layer the path feeds is rowwise FP8 (the FP8 screen may keep a layer in bf16:
that block keeps the path below it).
"""

from __future__ import annotations

import logging

import torch

from flux_kontext.optimizations import kernels
from flux_kontext.optimizations.attention.processor import kernel_choice
from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8
from flux_kontext.stack import Model, Optimization

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn


def expose_fp8_weight(linear: torch.nn.Module) -> bool:
    """Keep plain views of a torchao rowwise FP8 weight (qdata (N, K) e4m3, scale (N, 1)) on the module, so the
    compiled forward sees ordinary tensors; False when the layer is not quantized that way."""
    if getattr(linear, "fp8_weight_t", None) is not None:
        return True  # exposed already
    weight = getattr(linear, "weight", None)
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if qdata is None or scale is None or qdata.dtype != FP8 or tuple(scale.shape) != (qdata.shape[0], 1):
        return False
    # Buffers (not saved): plain tensors sharing torchao's storage; no copy.
    linear.register_buffer("fp8_weight_t", qdata.t(), persistent=False)  # (K, N) column-major, as _scaled_mm takes
    linear.register_buffer("fp8_weight_scale", scale.t(), persistent=False)  # (1, N)
    return True


def fp8_linear(values: torch.Tensor, scale: torch.Tensor, linear: torch.nn.Module, out_dtype) -> torch.Tensor:
    """``linear`` on activations already quantized rowwise: cuBLAS FP8 GEMM with both scales, bias fused; or, when
    the LoRA adapters' side path of that layer is on, the same GEMM with the side path added (lora_side.py: this
    call bypasses the module, so its forward hook does not run)."""
    side = getattr(linear, "lora_side", None)
    if side is not None and side.enabled:
        return side.fp8_linear(values, scale, linear, out_dtype)
    return torch._scaled_mm(
        values,
        linear.fp8_weight_t,
        scale_a=scale,
        scale_b=linear.fp8_weight_scale,
        bias=linear.bias,
        out_dtype=out_dtype,
        use_fast_accum=True,
    )


def fp8_linears(values: torch.Tensor, scale: torch.Tensor, linears: tuple, out_dtype) -> list[torch.Tensor]:
    """Several layers on the same quantized activations: ``fp8_linear`` each, except that LoRA side paths grouped on
    this input (lora_side.SharedInput) share one down projection."""
    side = getattr(linears[0], "lora_side", None)
    if side is not None and side.enabled and side.shares_input(linears):
        return side.fp8_linears(values, scale, linears, out_dtype)
    return [fp8_linear(values, scale, linear, out_dtype) for linear in linears]


def lora_input_columns(linears: tuple) -> int:
    """Columns the quantization kernel leaves after the activations for the LoRA side path's folded GEMM input
    (lora_k_augment.py: x_aug written in place, no copy); 0 without an active side path there."""
    return linears[0].lora_side.input_columns(linears) if _side_on(linears[0]) else 0


def single_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, **kwargs):
    """FluxSingleTransformerBlock.forward with proj_out's input quantized by the GELU kernel."""
    _refuse_attention_kwargs(kwargs)
    text_tokens = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    normed, gate = block.norm(hidden_states, emb=temb)
    mlp = block.proj_mlp(normed)
    attn = block.attn(hidden_states=normed, image_rotary_emb=image_rotary_emb)
    values, scale = kernels.gelu_fp8(attn, mlp, lora_input_columns((block.proj_out,)))
    out = fp8_linear(values, scale, block.proj_out, residual.dtype).reshape(residual.shape)
    hidden_states = residual + gate.unsqueeze(1) * out
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


def feed_forward(ff, hidden_states):
    """diffusers FeedForward (GELU-tanh projection, dropout, output linear) with the fused quantization."""
    mlp = ff.net[0].proj(hidden_states)
    return _gelu_output(ff, mlp, hidden_states.shape, hidden_states.dtype)


def _gelu_output(ff, mlp, shape, dtype):
    values, scale = kernels.gelu_fp8(None, mlp, lora_input_columns((ff.net[2],)))
    return fp8_linear(values, scale, ff.net[2], dtype).reshape(shape)


def _refuse_attention_kwargs(kwargs) -> None:
    if kwargs.get("joint_attention_kwargs"):
        raise ValueError("joint_attention_kwargs (IP-adapters, masks) are not supported by the fused FP8 blocks")


def _modulation(norm, temb):
    """The AdaLN modulation vectors (shift, scale, gate, ...) of one norm layer, each (batch, C).

    Where the layer is rowwise FP8 (its weight exposed), the activation is quantized here with torchao's arithmetic
    and the GEMM called as ``fp8_linear``: torchao's own activation quantization compares each dimension with its
    block size (``1 != batch``), a guard that specializes a compiled block to one image (or, for a batch dimension
    compiled unbacked, fails: compile's FLUX_COMPILE_BATCH)."""
    activation, linear = norm.silu(temb), norm.linear
    if getattr(linear, "fp8_weight_t", None) is None:
        out = linear(activation)
    else:
        # One spare row (the first, again): the GEMM's rows are then never one, where torch's FP8 GEMM cannot tell
        # rowwise from tensorwise scales by their shape, a question compiled code with an unbacked batch cannot
        # answer. The GEMM reads its weight once for every row: the row costs nothing measurable.
        rows = activation.shape[0]
        values, scale = quantize_rowwise_fp8(torch.cat([activation, activation[:1]]))
        out = fp8_linear(values, scale, linear, activation.dtype)[:rows]
    return out.chunk(linear.out_features // linear.in_features, dim=1)


def _norms(attn, added: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (attn.norm_added_q.weight, attn.norm_added_k.weight) if added else (attn.norm_q.weight, attn.norm_k.weight)


def _attention(attn, first, second, rotary, dtype):
    """Joint attention from the QKV GEMM output(s): RMSNorm + RoPE kernel, then the chosen attention kernel; with
    FA3 in FP8 active (FLUX_FP8_ATTENTION), the kernels write q, k (the static scales attention registered) and v
    (per head) in e4m3."""
    choice, added = kernel_choice(attn), second is not None
    norms = (_norms(attn, added), _norms(attn, False) if added else None)
    if not choice.fp8_for(attn):  # bf16 attention (also the layers and steps the FP8 policy keeps in bf16)
        q, k, v = kernels.qk_norm_rope(first, second, *norms, rotary, attn.heads, attn.norm_q.eps)
        return choice(q, k, v, attn).flatten(2, 3).to(dtype)
    scales = attn.fp8_qk_scale
    q8, k8, v8, v_descale = kernels.qk_norm_rope_fp8(first, second, *norms, rotary, attn.heads, attn.norm_q.eps, scales)
    q_descale, k_descale = (scale.expand_as(v_descale).contiguous() for scale in scales)
    return choice.fp8_call(q8, k8, v8, q_descale, k_descale, v_descale).flatten(2, 3).to(dtype)


def fused_single_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, **kwargs):
    """FluxSingleTransformerBlock.forward on our kernels: LN+modulation+FP8, two FP8 GEMMs, RMSNorm+RoPE, attention,
    GELU+FP8, the output GEMM and the gated residual."""
    _refuse_attention_kwargs(kwargs)
    attn, dtype = block.attn, hidden_states.dtype
    batch, text_tokens = encoder_hidden_states.shape[:2]
    shift, scale, gate = _modulation(block.norm, temb)
    linears, eps = (block.proj_mlp, attn.to_qkv), block.norm.norm.eps
    values, row_scale = kernels.ln_mod_fp8(
        encoder_hidden_states, hidden_states, shift, scale, eps, lora_input_columns(linears)
    )
    mlp, qkv = fp8_linears(values, row_scale, linears, dtype)
    qkv = qkv.view(batch, -1, attn.to_qkv.out_features)
    extra = lora_input_columns((block.proj_out,))
    values, row_scale = kernels.gelu_fp8(_attention(attn, qkv, None, image_rotary_emb, dtype), mlp, extra)
    proj_out = block.proj_out
    if not extra and _residual_epilogue(proj_out):  # the gated residual in the GEMM's epilogue (measured at start)
        weights = (proj_out.fp8_weight_t, proj_out.fp8_weight_scale, proj_out.bias)
        args = (values, row_scale, *weights, encoder_hidden_states, hidden_states, gate)
        hidden_states = kernels.fp8_gemm_gated_residual(*args)
    else:
        out = fp8_linear(values, row_scale, proj_out, dtype).view(batch, -1, proj_out.out_features)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1) + gate.unsqueeze(1) * out
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


def _residual_epilogue(linear) -> bool:
    """Whether ``linear`` (a single block's proj_out) runs the FP8 GEMM with the gated residual in its epilogue:
    fused_norm_rope set it where the start-up measurement found it right and fast (gemm_residual.measure), and no
    LoRA side path is on for this layer (its path adds to the GEMM's output)."""
    return getattr(linear, "fp8_residual_epilogue", False) and not _side_on(linear)


def _side_on(linear) -> bool:
    """Whether a LoRA side path is on for ``linear`` (this request's adapters target it)."""
    side = getattr(linear, "lora_side", None)
    return side is not None and side.enabled


def fused_double_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, **kwargs):
    """FluxTransformerBlock.forward on our kernels: per stream LN+modulation+FP8 and the FP8 QKV GEMM, one
    RMSNorm+RoPE writing the joint (text, image) q/k/v, attention, one FP8 quantization of its output and the output
    projections, then per stream the gated residual with LN+modulation+FP8 (one kernel), the MLP GEMM, GELU+FP8, the
    output GEMM and the gated residual."""
    _refuse_attention_kwargs(kwargs)
    attn, dtype = block.attn, hidden_states.dtype
    batch, text_tokens = encoder_hidden_states.shape[:2]
    image_mod, text_mod = _modulation(block.norm1, temb), _modulation(block.norm1_context, temb)
    eps = block.norm1.norm.eps

    def qkv(x, mod, linear):
        values, row_scale = kernels.ln_mod_fp8(x, None, mod[0], mod[1], eps, lora_input_columns((linear,)))
        return fp8_linear(values, row_scale, linear, dtype).view(batch, -1, linear.out_features)

    joint = _attention(
        attn,
        qkv(encoder_hidden_states, text_mod, attn.to_added_qkv),
        qkv(hidden_states, image_mod, attn.to_qkv),
        image_rotary_emb,
        dtype,
    )
    text_out, image_out = _attention_outputs(attn, joint, text_tokens, dtype)

    def stream(x, attn_out, mod, ff, norm2):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        # x + gate·attn_out and the LayerNorm + modulation + FP8 of it in one kernel: the new x written once (with
        # LoRA's fold, its columns left after each row)
        extra = lora_input_columns((ff.net[0].proj,))
        x, values, row_scale = kernels.residual_ln_mod_fp8(
            x, attn_out, gate_msa, shift_mlp, scale_mlp, norm2.eps, extra
        )
        mlp = fp8_linear(values, row_scale, ff.net[0].proj, dtype)
        return x + gate_mlp.unsqueeze(1) * _gelu_output(ff, mlp, x.shape, dtype)

    hidden_states = stream(hidden_states, image_out, image_mod, block.ff, block.norm2)
    encoder_hidden_states = stream(encoder_hidden_states, text_out, text_mod, block.ff_context, block.norm2_context)
    return encoder_hidden_states, hidden_states


def _attention_outputs(attn, joint, text_tokens: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """to_add_out(text rows), to_out[0](image rows) of the joint attention output (batch, tokens, C). Both layers
    rowwise FP8: the joint rows quantized in one kernel (one scale per row, so the split after it changes nothing),
    then each layer's FP8 GEMM; otherwise (a layer not rowwise FP8, or a LoRA side path on either: its hooks and
    fold work on the layer's own input) the layers' own forwards (torchao quantizes each input)."""
    to_out, to_add_out = attn.to_out[0], attn.to_add_out
    if not (_exposed(to_out) and _exposed(to_add_out)) or _side_on(to_out) or _side_on(to_add_out):
        text, image = joint.split_with_sizes([text_tokens, joint.shape[1] - text_tokens], dim=1)
        return to_add_out(text.contiguous()), to_out(image.contiguous())
    batch, tokens, width = joint.shape
    values, scale = kernels.rows_fp8(joint)
    values, scale = values.view(batch, tokens, width), scale.view(batch, tokens, 1)
    # The image rows start text_tokens rows in: a view where its values and scales stay 16-byte aligned (cuBLAS's
    # operands; FLUX's 512 text tokens), a copy otherwise; and a copy for several batch elements (reshape).
    aligned = text_tokens % 4 == 0 and (text_tokens * width) % 16 == 0

    def rows(t, part):  # one stream's rows as (rows, C)
        if part == 0:
            return t[:, :text_tokens].reshape(-1, t.shape[-1])
        image = t[:, text_tokens:].reshape(-1, t.shape[-1])
        return image if aligned else image.clone()

    text = fp8_linear(rows(values, 0), rows(scale, 0), to_add_out, dtype)
    image = fp8_linear(rows(values, 1), rows(scale, 1), to_out, dtype)
    return text, image


def _exposed(linear) -> bool:
    """Whether ``expose_fp8_weight`` found the layer rowwise FP8 (at apply time)."""
    return getattr(linear, "fp8_weight_t", None) is not None


def _fused_attention(attn) -> bool:
    """Our processor (its kernel choice), RMSNorm on q/k and the fused QKV layer."""
    return kernel_choice(attn) is not None and attn.norm_q is not None and hasattr(attn, "to_qkv")


def single_block_fusable(block) -> bool:
    fusable = _fused_attention(block.attn) and all(expose_fp8_weight(x) for x in (block.proj_mlp, block.attn.to_qkv))
    if fusable:  # the modulation: quantized by _modulation where it is rowwise FP8 (optional)
        expose_fp8_weight(block.norm.linear)
    return fusable


def double_block_fusable(block) -> bool:
    attn = block.attn
    layers = (attn.to_qkv, getattr(attn, "to_added_qkv", None), block.ff.net[0].proj, block.ff_context.net[0].proj)
    gelus = all(getattr(ff.net[0], "approximate", None) == "tanh" for ff in (block.ff, block.ff_context))
    fusable = _fused_attention(attn) and gelus and all(x is not None and expose_fp8_weight(x) for x in layers)
    if fusable:  # the output projections (fed by one quantization kernel) and the modulations, where rowwise FP8
        modulations = (block.norm1.linear, block.norm1_context.linear)
        for linear in (attn.to_out[0], getattr(attn, "to_add_out", None), *modulations):
            if linear is not None:
                expose_fp8_weight(linear)
    return fusable


def mlp_output_fusable(block) -> bool:
    """A single block whose proj_out reads [attention | MLP] and is rowwise FP8."""
    return block.proj_out.in_features > block.proj_mlp.out_features and expose_fp8_weight(block.proj_out)


def fusable_feed_forwards(block) -> list:
    """The tanh-GELU feed-forwards of a double block whose output layer is rowwise FP8."""
    outputs = [ff for ff in (block.ff, block.ff_context) if getattr(ff.net[0], "approximate", None) == "tanh"]
    return [ff for ff in outputs if expose_fp8_weight(ff.net[2])]


class BodyRerouting(Optimization):
    """Base of the optimizations that put one of these forwards in modules' ``body`` slot; undo empties the slots
    again (diffusers' forward). Warm-up undoes both fused optimizations together, newest first."""

    undoable = True

    def __init__(self, settings):
        super().__init__(settings)
        self._rerouted: list = []
        self._model: Model | None = None

    def _reroute(self, model: Model, module, forward) -> None:
        self._model = model
        model.slots.set_body(module, forward)
        self._rerouted.append(module)

    def undo(self) -> None:
        for module in self._rerouted:
            self._model.slots.clear(module, "body")
        self._rerouted.clear()
