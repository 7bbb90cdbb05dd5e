"""Triton kernels for the memory-bound work between the FP8 GEMMs of a FLUX block, each with its PyTorch reference.

Each kernel runs one program per token row, loads the row once, keeps it in registers and writes its result once:
- ``gelu_fp8``:   [attention output | GELU(MLP)] quantized rowwise to e4m3, the input of proj_out / ff.net[2].
- ``ln_mod_fp8``: LayerNorm (no affine) + AdaLN modulation x·(1 + scale) + shift, quantized rowwise to e4m3: the
                  input of the QKV / MLP GEMMs. Reads its rows from two tensors (text, image) when the block
                  concatenates them, so the concatenation is never written.
- ``qk_norm_rope``: the fused QKV GEMM's output split per head, RMSNorm on q and k, RoPE on q and k, written as
                  contiguous (batch, tokens, heads, head_dim) q, k, v for the attention kernel; two sources (text,
                  image rows with their own norm weights) are written as one concatenated sequence.
- ``qk_norm_rope_fp8``: the same for FA3 in FP8: q and k written in e4m3 with static scales, v's per-head absmax
                  taken on the way (atomic max), then a second kernel (``v_fp8_kernel``) writes v in e4m3 straight
                  from the QKV rows, with FA3's descales.

Under compile Inductor fuses the same work into reduction kernels that pass over each row twice (bench/ profiles:
1.5-3x the bytes' time). Arithmetic follows the unfused path (fp32 inside, the bf16 roundings diffusers makes,
torchao's rowwise scale: absmax / 448 floored at 1e-12); each ``reference_*`` is that arithmetic in PyTorch, what
CPUs run, and what the GPU check (bench/fused_blocks.py) compares the kernels with.

The kernels are registered as torch ops (``torch.library.triton_op``) by ``build_ops()`` at load time, never inside
compiled code, so torch.compile traces them as opaque calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_kontext.optimizations.activation import tanh_gelu
from flux_kontext.optimizations.quantization import quantize_per_head, quantize_rowwise_fp8, quantize_static

FP8 = torch.float8_e4m3fn
# The GELU kernel's warps per row: bench/fused_blocks.py sweeps 4-32 (H100, 2026-11-26): the single blocks' 15,360-wide
# rows 107 µs at 32 warps (112 at 16, 163 at 4), the feed-forwards' 12,288-wide rows 77 µs at 8 (79 at 16, 136 at 4).
GELU_NUM_WARPS = {True: 32, False: 8}  # keyed by "has the attention part"


def reference_gelu_fp8(attn: torch.Tensor | None, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[attn | GELU(mlp)] quantized rowwise to e4m3: (values (..., A+F), scales (..., 1) fp32)."""
    gelu = tanh_gelu(mlp)  # sigmoid form, rounded to mlp's dtype like the unfused path stores it
    return quantize_rowwise_fp8(gelu if attn is None else torch.cat([attn, gelu], dim=-1))


def reference_ln_mod_fp8(first, second, shift, scale, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(cat(first, second)) · (1 + scale) + shift, rounded to the input dtype, quantized rowwise:
    (values (rows, C), scales (rows, 1)); shift and scale are (batch, C)."""
    x = first if second is None else torch.cat([first, second], dim=1)
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)  # diffusers' AdaLayerNormZero: no affine
    modulated = normed * (1 + scale[:, None]) + shift[:, None]
    return quantize_rowwise_fp8(modulated.reshape(-1, x.shape[-1]))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm: fp32 statistics, rounded to the weight's dtype, times the weight."""
    normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(weight.dtype) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' apply_rotary_emb (real form, interleaved pairs) on (batch, tokens, heads, head_dim)."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


def reference_qk_norm_rope(first, second, norms_first, norms_second, rotary, heads: int, eps: float, fp8_scales=None):
    """(batch, tokens, 3·heads·head_dim) QKV rows -> q, k, v (batch, tokens, heads, head_dim): q and k RMS-normed
    (``norms_*`` = (q weight, k weight) of each source) and rotated; ``second``'s rows follow ``first``'s.
    With ``fp8_scales`` (q scale, k scale), q and k come out in e4m3, divided by their scale (FP8 attention)."""
    parts = []
    for qkv, norms in ((first, norms_first), (second, norms_second)):
        if qkv is None:
            continue
        weight_q, weight_k = norms
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in qkv.chunk(3, dim=-1))
        parts.append((_rms_norm(q, weight_q, eps), _rms_norm(k, weight_k, eps), v))
    q, k, v = (torch.cat(tensors, dim=1) for tensors in zip(*parts, strict=True))
    cos, sin = rotary
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if fp8_scales is not None:
        q, k = (quantize_static(t, fp8_scales[i]) for i, t in enumerate((q, k)))
    return q, k, v.contiguous()


def reference_qk_norm_rope_fp8(first, second, norms_first, norms_second, rotary, heads, eps, fp8_scales):
    """reference_qk_norm_rope in e4m3: q, k with the static scales, v per head; (q, k, v, v descales)."""
    q, k, v = reference_qk_norm_rope(first, second, norms_first, norms_second, rotary, heads, eps, fp8_scales)
    return (q, k, *quantize_per_head(v))


_OPS = None  # namespace of the registered ops, built by build_ops() (GPU only, once)


def build_ops():
    """Build the Triton kernels and register them as torch ops (traceable by torch.compile)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    import types

    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def gelu_fp8_kernel(
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

    def launch(kernel, raw: bool):
        """The kernel as torch ops call it (wrap_triton: traceable), or raw (benchmarks: no eager op overhead)."""
        return kernel if raw else wrap_triton(kernel)

    def launch_gelu_fp8(attn, mlp, has_attn: bool, num_warps: int | None = None, raw: bool = False):
        n_mlp = mlp.shape[-1]
        n_attn = attn.shape[-1] if has_attn else 0
        rows = mlp.numel() // n_mlp
        mlp2 = mlp.reshape(rows, n_mlp)
        attn2 = attn.reshape(rows, attn.shape[-1]) if has_attn else mlp2
        out = torch.empty((rows, n_attn + n_mlp), dtype=FP8, device=mlp.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=mlp.device)
        launch(gelu_fp8_kernel, raw)[(rows,)](
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
            num_warps=num_warps or GELU_NUM_WARPS[has_attn],
        )
        return out, scale

    @triton_op("flux_kontext::gelu_fp8_rowwise", mutates_args={})
    def gelu_fp8(attn: torch.Tensor, mlp: torch.Tensor, has_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_gelu_fp8(attn, mlp, has_attn)

    @triton.jit
    def ln_mod_fp8_kernel(
        first_ptr,
        second_ptr,
        shift_ptr,
        scale_ptr,
        out_ptr,
        out_scale_ptr,
        n_first,
        seq,
        n_cols,
        first_sb,
        first_ss,
        second_sb,
        second_ss,
        shift_sb,
        scale_sb,
        eps,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // seq
        s = row % seq
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if s >= n_first:  # never true without a second source: n_first == seq
            x = tl.load(second_ptr + b * second_sb + (s - n_first) * second_ss + cols, mask=mask, other=0.0)
        else:
            x = tl.load(first_ptr + b * first_sb + s * first_ss + cols, mask=mask, other=0.0)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centered = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / n_cols
        normed = (centered * tl.rsqrt(var + eps)).to(tl.bfloat16).to(tl.float32)  # nn.LayerNorm's bf16 output
        shift = tl.load(shift_ptr + b * shift_sb + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * scale_sb + cols, mask=mask, other=0.0).to(tl.float32)
        # x·(1 + scale) + shift with eager bf16's roundings: each op's result is bf16.
        one_plus = (1.0 + scale).to(tl.bfloat16).to(tl.float32)
        y = (normed * one_plus).to(tl.bfloat16).to(tl.float32)
        y = (y + shift).to(tl.bfloat16).to(tl.float32)  # the bf16 activation of the GEMM
        y = tl.where(mask, y, 0.0)
        q_scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
        q = tl.clamp(y / q_scale, -448.0, 448.0)
        tl.store(out_ptr + row * n_cols + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(out_scale_ptr + row, q_scale)

    def launch_ln_mod_fp8(first, second, shift, scale, has_second: bool, eps: float, raw=False, num_warps=4):
        batch, n_first, n_cols = first.shape
        seq = n_first + (second.shape[1] if has_second else 0)
        out = torch.empty((batch * seq, n_cols), dtype=FP8, device=first.device)
        out_scale = torch.empty((batch * seq, 1), dtype=torch.float32, device=first.device)
        launch(ln_mod_fp8_kernel, raw)[(batch * seq,)](
            first,
            second,
            shift,
            scale,
            out,
            out_scale,
            n_first,
            seq,
            n_cols,
            first.stride(0),
            first.stride(1),
            second.stride(0),
            second.stride(1),
            shift.stride(0),
            scale.stride(0),
            eps,
            BLOCK=triton.next_power_of_2(n_cols),
            num_warps=num_warps,
        )
        return out, out_scale

    @triton_op("flux_kontext::ln_mod_fp8_rowwise", mutates_args={})
    def ln_mod_fp8(
        first: torch.Tensor,
        second: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        has_second: bool,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_ln_mod_fp8(first, second, shift, scale, has_second, eps)

    @triton.jit
    def qk_norm_rope_kernel(
        first_ptr,
        second_ptr,
        wq_first,
        wk_first,
        wq_second,
        wk_second,
        cos_ptr,
        sin_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        qk_scale_ptr,
        v_amax_ptr,
        n_first,
        seq,
        n_heads,
        first_sb,
        first_ss,
        second_sb,
        second_ss,
        eps,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        FP8_QK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // seq
        s = row % seq
        width = n_heads * HEAD_DIM
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        offsets = h * HEAD_DIM + d  # (heads, head_dim) tile of one of q, k, v: contiguous loads and stores
        mask = (h < n_heads) & (d < HEAD_DIM)
        if s >= n_first:  # never true without a second source: n_first == seq
            src = second_ptr + b * second_sb + (s - n_first) * second_ss
            wq = wq_second
            wk = wk_second
        else:
            src = first_ptr + b * first_sb + s * first_ss
            wq = wq_first
            wk = wk_first
        cos = tl.load(cos_ptr + s * HEAD_DIM + d).to(tl.float32)
        sin = tl.load(sin_ptr + s * HEAD_DIM + d).to(tl.float32)
        dst = row * width
        for part in tl.static_range(2):  # q, then k; ``part`` is a compile-time constant
            if part == 0:
                weight = wq
                out = q_ptr + dst
            else:
                weight = wk
                out = k_ptr + dst
            x = tl.load(src + part * width + offsets, mask=mask, other=0.0).to(tl.float32)
            inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
            w = tl.load(weight + d).to(tl.float32)
            # RMSNorm as diffusers rounds it (normalized -> bf16, times the bf16 weight -> bf16), then RoPE in fp32
            # on interleaved pairs: rotated[2i] = -x[2i+1], rotated[2i+1] = x[2i].
            n = ((x * inv_rms).to(tl.bfloat16).to(tl.float32) * w).to(tl.bfloat16).to(tl.float32)
            even, odd = tl.split(tl.reshape(n, (BLOCK_H, HEAD_DIM // 2, 2)))
            rotated = tl.reshape(tl.join(-odd, even), (BLOCK_H, HEAD_DIM))
            result = (n * cos + rotated * sin).to(tl.bfloat16)
            if FP8_QK:  # e4m3 for FP8 attention, with the static scale of attention.fp8_qk_scales()
                result = tl.clamp(result.to(tl.float32) / tl.load(qk_scale_ptr + part), -448.0, 448.0)
                result = result.to(tl.float8e4nv)
            tl.store(out + offsets, result, mask=mask)
        v = tl.load(src + 2 * width + offsets, mask=mask, other=0.0)
        if FP8_QK:  # v's per-head absmax over all tokens (v_fp8_kernel quantizes it after this kernel)
            heads_1d = tl.arange(0, BLOCK_H)
            v_amax = tl.max(tl.abs(v.to(tl.float32)), axis=1)
            tl.atomic_max(v_amax_ptr + b * n_heads + heads_1d, v_amax, mask=heads_1d < n_heads)
        else:
            tl.store(v_ptr + dst + offsets, v, mask=mask)

    @triton.jit
    def v_fp8_kernel(
        first_ptr,
        second_ptr,
        v_amax_ptr,
        v_ptr,
        descale_ptr,
        n_first,
        seq,
        n_heads,
        first_sb,
        first_ss,
        second_sb,
        second_ss,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # v from the QKV rows (one or two sources, as qk_norm_rope_kernel reads them) to e4m3 with its per-head scale
        # (absmax / 448), written contiguous (batch, tokens, heads, head_dim); the first token of each batch also
        # writes the descales FA3 takes.
        row = tl.program_id(0).to(tl.int64)
        b = row // seq
        s = row % seq
        width = n_heads * HEAD_DIM
        heads_1d = tl.arange(0, BLOCK_H)
        h = heads_1d[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        offsets = h * HEAD_DIM + d
        mask = (h < n_heads) & (d < HEAD_DIM)
        if s >= n_first:
            src = second_ptr + b * second_sb + (s - n_first) * second_ss
        else:
            src = first_ptr + b * first_sb + s * first_ss
        amax = tl.load(v_amax_ptr + b * n_heads + heads_1d, mask=heads_1d < n_heads, other=1.0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        v = tl.load(src + 2 * width + offsets, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(v / scale[:, None], -448.0, 448.0)
        tl.store(v_ptr + row * width + offsets, q.to(tl.float8e4nv), mask=mask)
        if s == 0:
            tl.store(descale_ptr + b * n_heads + heads_1d, scale, mask=heads_1d < n_heads)

    def launch_qk_norm_rope(
        first,
        second,
        wq_first,
        wk_first,
        wq_second,
        wk_second,
        cos,
        sin,
        qk_scale,
        has_second,
        heads,
        eps,
        fp8_qk,
        raw=False,
    ):
        batch, n_first, width3 = first.shape
        head_dim = width3 // 3 // heads
        seq = n_first + (second.shape[1] if has_second else 0)
        qk_dtype = FP8 if fp8_qk else first.dtype
        q, k, v = (torch.empty((batch, seq, heads, head_dim), dtype=qk_dtype, device=first.device) for _ in "qkv")
        v_amax = torch.zeros((batch, heads), dtype=torch.float32, device=first.device) if fp8_qk else qk_scale
        launch(qk_norm_rope_kernel, raw)[(batch * seq,)](
            first,
            second,
            wq_first,
            wk_first,
            wq_second,
            wk_second,
            cos,
            sin,
            q,
            k,
            v,
            qk_scale,
            v_amax,
            n_first,
            seq,
            heads,
            first.stride(0),
            first.stride(1),
            second.stride(0),
            second.stride(1),
            eps,
            HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(heads),
            FP8_QK=fp8_qk,
            num_warps=4,
        )
        if not fp8_qk:
            return q, k, v
        v_descale = torch.empty((batch, heads), dtype=torch.float32, device=first.device)
        launch(v_fp8_kernel, raw)[(batch * seq,)](
            first,
            second,
            v_amax,
            v,
            v_descale,
            n_first,
            seq,
            heads,
            first.stride(0),
            first.stride(1),
            second.stride(0),
            second.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(heads),
            num_warps=4,
        )
        return q, k, v, v_descale

    @triton_op("flux_kontext::qk_norm_rope", mutates_args={})
    def qk_norm_rope(
        first: torch.Tensor,
        second: torch.Tensor,
        wq_first: torch.Tensor,
        wk_first: torch.Tensor,
        wq_second: torch.Tensor,
        wk_second: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        has_second: bool,
        heads: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_qk_norm_rope(
            first, second, wq_first, wk_first, wq_second, wk_second, cos, sin, cos, has_second, heads, eps, False
        )

    @triton_op("flux_kontext::qk_norm_rope_fp8", mutates_args={})
    def qk_norm_rope_fp8(
        first: torch.Tensor,
        second: torch.Tensor,
        wq_first: torch.Tensor,
        wk_first: torch.Tensor,
        wq_second: torch.Tensor,
        wk_second: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        qk_scale: torch.Tensor,
        has_second: bool,
        heads: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_qk_norm_rope(
            first, second, wq_first, wk_first, wq_second, wk_second, cos, sin, qk_scale, has_second, heads, eps, True
        )

    _OPS = types.SimpleNamespace(
        gelu_fp8=gelu_fp8,
        ln_mod_fp8=ln_mod_fp8,
        qk_norm_rope=qk_norm_rope,
        qk_norm_rope_fp8=qk_norm_rope_fp8,
        launch_gelu_fp8=launch_gelu_fp8,
        launch_ln_mod_fp8=launch_ln_mod_fp8,
        launch_qk_norm_rope=launch_qk_norm_rope,
    )
    return _OPS


def _on_kernel(t: torch.Tensor) -> bool:
    return _OPS is not None and t.is_cuda and t.dtype == torch.bfloat16


def gelu_fp8(attn: torch.Tensor | None, mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[attn | GELU(mlp)] quantized rowwise: values (rows, A+F), scales (rows, 1); the kernel on the GPU."""
    if attn is not None:
        attn = attn.reshape(*mlp.shape[:-1], attn.shape[-1])  # (batch, tokens, C) next to (rows, F) GEMM outputs
    if not _on_kernel(mlp):
        values, scale = reference_gelu_fp8(attn, mlp)
        return values.reshape(-1, values.shape[-1]), scale.reshape(-1, 1)
    has_attn = attn is not None
    return _OPS.gelu_fp8(attn.contiguous() if has_attn else mlp, mlp.contiguous(), has_attn)


def ln_mod_fp8(first, second, shift, scale, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Modulated LayerNorm of cat(first, second) (batch, tokens, C), quantized rowwise: (values, scales)."""
    if not _on_kernel(first):
        return reference_ln_mod_fp8(first, second, shift, scale, eps)
    has_second = second is not None
    first = first if first.stride(-1) == 1 else first.contiguous()
    second = (second if second.stride(-1) == 1 else second.contiguous()) if has_second else first
    return _OPS.ln_mod_fp8(first, second, shift, scale, has_second, eps)


def qk_norm_rope(first, second, norms_first, norms_second, rotary, heads: int, eps: float):
    """q, k, v (batch, tokens, heads, head_dim) from QKV rows: RMSNorm and RoPE on q and k; see the reference."""
    if not _on_kernel(first):
        return reference_qk_norm_rope(first, second, norms_first, norms_second, rotary, heads, eps)
    return _OPS.qk_norm_rope(*_qk_args(first, second, norms_first, norms_second, rotary), heads, eps)


def qk_norm_rope_fp8(first, second, norms_first, norms_second, rotary, heads: int, eps: float, fp8_scales):
    """As qk_norm_rope, for FA3 in FP8: q, k in e4m3 with the static ``fp8_scales`` (attention.fp8_qk_scales), v in
    e4m3 with per-head scales; returns (q, k, v, v descales (batch, heads))."""
    if not _on_kernel(first):
        return reference_qk_norm_rope_fp8(first, second, norms_first, norms_second, rotary, heads, eps, fp8_scales)
    first_, second_, *weights, cos, sin, has_second = _qk_args(first, second, norms_first, norms_second, rotary)
    return _OPS.qk_norm_rope_fp8(first_, second_, *weights, cos, sin, fp8_scales, has_second, heads, eps)


def _qk_args(first, second, norms_first, norms_second, rotary) -> tuple:
    has_second = second is not None
    norms_second = norms_second if has_second else norms_first
    cos, sin = (t.contiguous() for t in rotary)
    return (first, second if has_second else first, *norms_first, *norms_second, cos, sin, has_second)
