"""QK norm + RoPE: the fused QKV GEMM's output split per head, RMSNorm and RoPE on q and k, written as contiguous
(batch, tokens, heads, head_dim) q, k, v for the attention kernel (two sources, text and image rows with their own
norm weights, written as one sequence); in FP8 for FA3, q and k in e4m3 with static scales and v per head (its absmax
taken on the way, then ``v_fp8_kernel``). The Triton kernels next to their PyTorch references."""

from __future__ import annotations

import torch

from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_per_head, quantize_static

# Tokens per program of the RMSNorm + RoPE kernel (one batch element's consecutive tokens; in FP8, v's absmax leaves
# each program in one atomic max per head). bench/kernels_rows.py on H200 (BENCHMARKS.md, #18), 4,608 tokens with v to
# e4m3, µs per launch: 138 / 151 / 202 / 264 at 1 / 2 / 4 / 8 tokens (the previous kernel: 155): one it is.
QK_ROWS_PER_PROGRAM = 1
# Heads per program (a power of two; None: all of them, 24 padded to 32): smaller groups leave no padded head and
# more, smaller programs (bench/kernels_rows.py's ``heads_*`` variants).
QK_HEADS_PER_PROGRAM = None
# Warps per program: the (24 heads -> 32) x 128 tile is 4,096 values per q or k; bench/kernels_rows.py on H200
# (2026-12-03, 4,608 tokens with v to e4m3): 66.5 / 51.6 / 64.2 / 65.0 µs at 1 / 2 / 4 / 8 warps (head groups of 8 at
# 1 or 2 warps 52.7): two it is, codes identical to four's.
QK_NUM_WARPS = 2
# Warps per program of v_fp8_kernel (one token's 24 heads x 128 per program): bench/kernels_rows.py's ``v_warps_*``
# on H200 (2026-12-03), with the kernel above at 2 warps: 52.3 / 51.7 / 51.5 / 51.4 µs at 1 / 2 / 4 / 8, the same.
V_NUM_WARPS = 4


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


def build(launch) -> dict:
    """The Triton kernels, their launcher and the ``flux_kontext::qk_norm_rope`` / ``flux_kontext::qk_norm_rope_fp8``
    ops (registered: call once per process, through kernels.ops()); ``launch(kernel, raw)`` is how launchers call a
    kernel."""
    import triton
    import triton.language as tl
    from torch.library import triton_op

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
        ROWS: tl.constexpr,
    ):
        # ROWS tokens of one batch element and BLOCK_H of its heads per program (grid: token blocks x batch x head
        # groups): v's per-head absmax is taken over them in registers and goes out in one atomic max per head, not
        # one per token.
        b = tl.program_id(1).to(tl.int64)
        first_token = tl.program_id(0).to(tl.int64) * ROWS
        width = n_heads * HEAD_DIM
        heads_1d = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
        h = heads_1d[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        offsets = h * HEAD_DIM + d  # (heads, head_dim) tile of one of q, k, v: contiguous loads and stores
        v_amax = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for r in tl.static_range(ROWS):
            s = first_token + r
            mask = (h < n_heads) & (d < HEAD_DIM) & (s < seq)
            if s >= n_first:  # never true without a second source: n_first == seq
                src = second_ptr + b * second_sb + (s - n_first) * second_ss
                wq = wq_second
                wk = wk_second
            else:
                src = first_ptr + b * first_sb + s * first_ss
                wq = wq_first
                wk = wk_first
            in_seq = (d < HEAD_DIM) & (s < seq)
            cos = tl.load(cos_ptr + s * HEAD_DIM + d, mask=in_seq, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + s * HEAD_DIM + d, mask=in_seq, other=0.0).to(tl.float32)
            dst = (b * seq + s) * width
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
                # RMSNorm as diffusers rounds it (normalized -> bf16, times the bf16 weight -> bf16), then RoPE in
                # fp32 on interleaved pairs: rotated[2i] = -x[2i+1], rotated[2i+1] = x[2i].
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
                v_amax = tl.maximum(v_amax, tl.max(tl.abs(v.to(tl.float32)), axis=1))
            else:
                tl.store(v_ptr + dst + offsets, v, mask=mask)
        if FP8_QK:
            tl.atomic_max(v_amax_ptr + b * n_heads + heads_1d, v_amax, mask=heads_1d < n_heads)

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
        rows=None,
        num_warps=None,
        block_h=None,
        v_warps=None,
    ):
        batch, n_first, width3 = first.shape
        head_dim = width3 // 3 // heads
        seq = n_first + (second.shape[1] if has_second else 0)
        qk_dtype = FP8 if fp8_qk else first.dtype
        q, k, v = (torch.empty((batch, seq, heads, head_dim), dtype=qk_dtype, device=first.device) for _ in "qkv")
        v_amax = torch.zeros((batch, heads), dtype=torch.float32, device=first.device) if fp8_qk else qk_scale
        rows = rows or QK_ROWS_PER_PROGRAM
        block_h = block_h or QK_HEADS_PER_PROGRAM or triton.next_power_of_2(heads)
        launch(qk_norm_rope_kernel, raw)[(triton.cdiv(seq, rows), batch, triton.cdiv(heads, block_h))](
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
            BLOCK_H=block_h,
            FP8_QK=fp8_qk,
            ROWS=rows,
            num_warps=num_warps or QK_NUM_WARPS,
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
            num_warps=v_warps or V_NUM_WARPS,
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

    return {
        "qk_norm_rope": qk_norm_rope,
        "qk_norm_rope_fp8": qk_norm_rope_fp8,
        "launch_qk_norm_rope": launch_qk_norm_rope,
    }


def _qk_args(first, second, norms_first, norms_second, rotary) -> tuple:
    has_second = second is not None
    norms_second = norms_second if has_second else norms_first
    cos, sin = (t.contiguous() for t in rotary)
    return (first, second if has_second else first, *norms_first, *norms_second, cos, sin, has_second)
