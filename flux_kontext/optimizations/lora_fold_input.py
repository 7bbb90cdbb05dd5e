"""The low-rank columns of LoRA's folded GEMM input, x_aug = [x8 | t' | 0] (lora_k_augment.py), written into the
buffer the block's quantization kernel left them in (kernels.ln_mod_fp8 with ``extra`` columns), with a guard that
makes the fold saturation-proof.

t = x8 A^T / c_r per row (the down projection in FP8 units, times the factor that put B''s largest entry at e4m3's
largest value) must fit e4m3: |t| <= 448. Where a row's largest |t| is above it, the row is rescaled by a power of
two 2^j (the smallest that fits, at most 2^MAX_EXPONENT): its x8 values are divided by 2^j (exact in e4m3 down to
its subnormals), its row scale multiplied by 2^j, its t divided by 2^j. The GEMM's result for that row is the same
(sx 2^j · (x8 / 2^j · W8 + t / 2^j · B')), with x8's smallest values rounded a little coarser. So an adapter as
strong as the request likes (or a high scale) costs a few rows' rewrite, never a clamped delta; only beyond 2^8 more
headroom are t's entries clamped, and counted. Rows that fit (all of them, for ordinary adapters) cost the t'
columns' write only: the kernel reads x8 again only for the rows it rescales.

Copies: where x_aug's width leaves room after t' (cuBLAS runs some K multiples faster: the chosen width often has
spare zero columns), t' is written ``copies`` times, each copy t / copies (t_scale carries the 1 / copies: the
caller's), and W_aug holds B' once per copy: sum over the copies of (t / copies) · B' = t · B', with ``copies`` times
the room before a row needs the guard, in columns the GEMM reads anyway.

Counters (int32, on the device, added to by every call): [rows rescaled, entries clamped]; lora.py reads them after
each request (asynchronously) and reports them in /health per adapter.

The Triton kernel (GPU) and its reference (CPU, and what the kernel is checked against) compute the same thing; the
op is registered with its mutations declared, so torch.compile writes into the buffers in place.
"""

from __future__ import annotations

import functools

import torch

from flux_kontext.optimizations.kernels.e4m3 import E4M3_MAX, FP8

MAX_EXPONENT = 11
BLOCK_M, BLOCK_K = 32, 256


def rescale_exponents(top: torch.Tensor) -> torch.Tensor:
    """The power of two each row's t is divided by: the smallest j >= 0 with top / 2^j <= 448, at most MAX_EXPONENT."""
    need = torch.ceil(torch.log2(top.clamp_min(E4M3_MAX) / E4M3_MAX))
    return need.clamp(0, MAX_EXPONENT)


def reference_fold_input(x_aug, row_scale, low, t_scale, counters, fan_in: int, copies: int = 1) -> None:
    """What the kernel does, in PyTorch: t' ``copies`` times (then zeros in the padding) into x_aug[:, fan_in:], the
    rows whose t does not fit e4m3 rescaled, the counters added to."""
    extra = low.shape[1]
    t = low.float() / row_scale * t_scale
    exponent = rescale_exponents(t.abs().amax(dim=1, keepdim=True))
    factor = torch.exp2(-exponent)
    rescaled = exponent > 0
    x_aug[:, :fan_in] = torch.where(rescaled, x_aug[:, :fan_in].float() * factor, x_aug[:, :fan_in].float()).to(FP8)
    row_scale.mul_(torch.exp2(exponent))
    t = t * factor
    clamped = t.abs() > E4M3_MAX
    x_aug[:, fan_in : fan_in + copies * extra] = t.clamp(-E4M3_MAX, E4M3_MAX).to(FP8).repeat(1, copies)
    x_aug[:, fan_in + copies * extra :].zero_()
    counters[0] += rescaled.sum().to(counters.dtype)
    counters[1] += clamped.sum().to(counters.dtype)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fold_input_kernel(
        x_ptr,
        scale_ptr,
        low_ptr,
        t_scale_ptr,
        counters_ptr,
        rows,
        extra,
        copies,
        tail,
        x_stride,
        scale_stride,
        low_stride,
        FAN_IN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        MAX_EXPONENT: tl.constexpr,
    ):
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rt = tl.arange(0, BLOCK_T)  # x_aug's columns after x8: t' copies, then padding
        source = rt % extra  # each copy's column reads its rank column of low
        in_copy = rt < copies * extra
        row_ok = rm < rows
        low = tl.load(
            low_ptr + rm[:, None] * low_stride + source[None, :], mask=row_ok[:, None] & in_copy[None, :], other=0.0
        ).to(tl.float32)
        t_scale = tl.load(t_scale_ptr + source, mask=in_copy, other=0.0)
        sx = tl.load(scale_ptr + rm * scale_stride, mask=row_ok, other=1.0)
        t = low / sx[:, None] * t_scale[None, :]
        top = tl.maximum(tl.max(tl.abs(t), axis=1), 448.0)
        exponent = tl.minimum(tl.ceil(tl.log2(top / 448.0)), MAX_EXPONENT)
        factor = tl.exp2(-exponent)
        t = t * factor[:, None]
        over = (tl.abs(t) > 448.0) & row_ok[:, None] & (rt < extra)[None, :]  # counted once, not per copy
        clamped = tl.sum(tl.sum(over.to(tl.int32), axis=1), axis=0)
        q = tl.clamp(t, -448.0, 448.0).to(tl.float8e4nv)  # padding columns: 0 (low and t_scale masked to 0)
        tl.store(x_ptr + rm[:, None] * x_stride + FAN_IN + rt[None, :], q, mask=row_ok[:, None] & (rt[None, :] < tail))
        rescale = row_ok & (exponent > 0)
        rescaled = tl.sum(rescale.to(tl.int32), axis=0)
        if rescaled > 0:  # rare: only then is x8 read again, and only its rescaled rows written
            tl.store(scale_ptr + rm * scale_stride, sx * tl.exp2(exponent), mask=rescale)
            for start in tl.range(0, FAN_IN, BLOCK_K):
                rk = start + tl.arange(0, BLOCK_K)
                mask = rescale[:, None] & (rk[None, :] < FAN_IN)
                pointers = x_ptr + rm[:, None] * x_stride + rk[None, :]
                x = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
                tl.store(pointers, (x * factor[:, None]).to(tl.float8e4nv), mask=mask)
            tl.atomic_add(counters_ptr, rescaled)
        if clamped > 0:
            tl.atomic_add(counters_ptr + 1, clamped)

    def launch(x_aug, row_scale, low, t_scale, counters, fan_in: int, copies: int = 1) -> None:
        rows, width = x_aug.shape
        tail = width - fan_in
        fold_input_kernel[(triton.cdiv(rows, BLOCK_M),)](
            x_aug,
            row_scale,
            low,
            t_scale,
            counters,
            rows,
            low.shape[1],
            copies,
            tail,
            x_aug.stride(0),
            row_scale.stride(0),
            low.stride(0),
            FAN_IN=fan_in,
            BLOCK_M=BLOCK_M,
            BLOCK_T=triton.next_power_of_2(tail),
            BLOCK_K=BLOCK_K,
            MAX_EXPONENT=MAX_EXPONENT,
            num_warps=4,
        )

    return launch


@torch.library.custom_op("flux_kontext::lora_fold_input", mutates_args=("x_aug", "row_scale", "counters"))
def fold_input(
    x_aug: torch.Tensor,
    row_scale: torch.Tensor,
    low: torch.Tensor,
    t_scale: torch.Tensor,
    counters: torch.Tensor,
    fan_in: int,
    copies: int = 1,
) -> None:
    """x_aug[:, fan_in:] = [t' (``copies`` times) | 0] from the down projection ``low`` (M, R) = x A^T and the
    columns' factors ``t_scale`` (1, R); rows whose t' would not fit e4m3 rescaled in place (x_aug's x8 and
    ``row_scale``, (M, 1)); ``counters`` (2,) int32 added to: rows rescaled, entries clamped. The Triton kernel on
    CUDA, else the reference."""
    if x_aug.is_cuda and low.stride(1) == 1 and t_scale.is_contiguous():
        _kernel()(x_aug, row_scale, low, t_scale, counters, fan_in, copies)
    else:
        reference_fold_input(x_aug, row_scale, low, t_scale, counters, fan_in, copies)


@fold_input.register_fake
def _(x_aug, row_scale, low, t_scale, counters, fan_in, copies=1):
    return None


class GuardCounts:
    """The guard's device counters read back without stalling the GPU: after a request the counters are copied to
    host memory asynchronously (an event marks the copy); the next ``collect`` reads them once the copy is done and
    adds what that request's adapters caused to their totals (per adapter name: rows rescaled, entries clamped)."""

    def __init__(self, counters: torch.Tensor):
        self.counters = counters
        cuda = counters.is_cuda
        self.host = torch.zeros(2, dtype=counters.dtype, pin_memory=cuda)
        self.seen = [0, 0]
        self.pending: tuple[str, ...] | None = None
        self.event = None
        self.by_adapter: dict[str, dict[str, int]] = {}

    def after_request(self, names: tuple[str, ...]) -> None:
        self.collect(wait=True)  # at most one request outstanding
        self.host.copy_(self.counters, non_blocking=self.counters.is_cuda)
        if self.counters.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        self.pending = names

    def collect(self, wait: bool = False) -> dict[str, dict[str, int]]:
        """Per adapter: {"rows_rescaled", "entries_clamped"} so far (up to the last request whose copy is done)."""
        if self.pending is not None and (self.event is None or wait or self.event.query()):
            if self.event is not None:
                self.event.synchronize()
            now = self.host.tolist()
            rows, clamped = now[0] - self.seen[0], now[1] - self.seen[1]
            self.seen = now
            for name in self.pending:
                totals = self.by_adapter.setdefault(name, {"rows_rescaled": 0, "entries_clamped": 0})
                totals["rows_rescaled"] += rows
                totals["entries_clamped"] += clamped
            self.pending = None
        return self.by_adapter
