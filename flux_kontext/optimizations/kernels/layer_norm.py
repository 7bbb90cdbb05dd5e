"""Modulated LayerNorm + FP8: LayerNorm (no affine) + AdaLN modulation x·(1 + scale) + shift, quantized rowwise to
e4m3, the input of the QKV / MLP GEMMs; rows read from two tensors (text, image) when the block concatenates them, so
the concatenation is never written. Beside it, the double blocks' gated residual fused in front of it, and plain
rowwise e4m3 (the joint attention output). The Triton kernels (triton_ln_rows.py) next to their PyTorch references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_kontext.optimizations.kernels.e4m3 import FP8, quantize_rowwise_fp8


def reference_ln_mod_fp8(first, second, shift, scale, eps: float, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(cat(first, second)) · (1 + scale) + shift, rounded to the input dtype, quantized rowwise:
    (values (rows, C + extra), scales (rows, 1)); shift and scale are (batch, C). ``extra`` columns after the C
    values are left for the caller to write (LoRA's folded up projection: lora_k_augment.py); here zeros."""
    x = first if second is None else torch.cat([first, second], dim=1)
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)  # diffusers' AdaLayerNormZero: no affine
    modulated = normed * (1 + scale[:, None]) + shift[:, None]
    values, scales = quantize_rowwise_fp8(modulated.reshape(-1, x.shape[-1]))
    if extra:
        values = torch.cat([values, values.new_zeros(values.shape[0], extra)], dim=1)
    return values, scales


def reference_residual_ln_mod_fp8(x, y, gate, shift, scale, eps: float, extra: int = 0):
    """The gated residual x + gate·y (x, y (batch, tokens, C), gate (batch, C)) as diffusers' block computes it, then
    reference_ln_mod_fp8 of it: (new x, values (rows, C + extra), scales (rows, 1)). The kernel rounds x + gate·y once
    (fp32 inside, as Inductor's fused kernel did), eager bf16 rounds the product too: at most a bf16 step apart."""
    x = x + gate.unsqueeze(1) * y
    return (x, *reference_ln_mod_fp8(x, None, shift, scale, eps, extra))


def reference_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., C) rows to e4m3 with their own scales (torchao's rowwise arithmetic): (values (rows, C), scales
    (rows, 1))."""
    return quantize_rowwise_fp8(x.reshape(-1, x.shape[-1]))


def build(launch) -> dict:
    """The Triton kernels' launchers and the ``flux_kontext::ln_mod_fp8_rowwise``, ``flux_kontext::residual_ln_mod_fp8``
    and ``flux_kontext::rows_fp8`` ops (registered: call once per process, through kernels.ops());
    ``launch(kernel, raw)`` is how launchers call a kernel."""
    import triton
    from torch.library import triton_op

    from flux_kontext.optimizations.kernels import triton_ln_rows as rows

    def outputs(n_rows: int, n_cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.empty((n_rows, n_cols), dtype=FP8, device=device)
        return values, torch.empty((n_rows, 1), dtype=torch.float32, device=device)

    def launch_ln_mod_fp8(
        first, second, shift, scale, has_second: bool, eps: float, extra: int = 0, raw=False, num_warps=4
    ):
        """``extra``: columns left unwritten after each row's C values (the caller writes them)."""
        batch, n_first, n_cols = first.shape
        seq = n_first + (second.shape[1] if has_second else 0)
        out, out_scale = outputs(batch * seq, n_cols + extra, first.device)
        launch(rows.ln_mod_fp8_kernel, raw)[(batch * seq,)](
            first,
            second,
            shift,
            scale,
            out,
            out_scale,
            out.stride(0),
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

    def launch_residual_ln_mod_fp8(x, y, gate, shift, scale, eps: float, extra: int = 0, raw=False, num_warps=4):
        """``extra``: as launch_ln_mod_fp8's."""
        batch, seq, n_cols = x.shape
        x_out = torch.empty((batch, seq, n_cols), dtype=x.dtype, device=x.device)
        out, out_scale = outputs(batch * seq, n_cols + extra, x.device)
        launch(rows.residual_ln_mod_fp8_kernel, raw)[(batch * seq,)](
            x,
            y,
            gate,
            shift,
            scale,
            x_out,
            out,
            out_scale,
            out.stride(0),
            seq,
            n_cols,
            x.stride(0),
            x.stride(1),
            y.stride(0),
            y.stride(1),
            gate.stride(0),
            shift.stride(0),
            scale.stride(0),
            eps,
            BLOCK=triton.next_power_of_2(n_cols),
            num_warps=num_warps,
        )
        return x_out, out, out_scale

    def launch_rows_fp8(x, raw=False, num_warps=4):
        n_rows, n_cols = x.shape
        out, out_scale = outputs(n_rows, n_cols, x.device)
        launch(rows.rows_fp8_kernel, raw)[(n_rows,)](
            x, out, out_scale, n_cols, x.stride(0), BLOCK=triton.next_power_of_2(n_cols), num_warps=num_warps
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
        extra: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_ln_mod_fp8(first, second, shift, scale, has_second, eps, extra)

    @triton_op("flux_kontext::residual_ln_mod_fp8", mutates_args={})
    def residual_ln_mod_fp8(
        x: torch.Tensor,
        y: torch.Tensor,
        gate: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        eps: float,
        extra: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_residual_ln_mod_fp8(x, y, gate, shift, scale, eps, extra)

    @triton_op("flux_kontext::rows_fp8", mutates_args={})
    def rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_rows_fp8(x)

    return {
        "ln_mod_fp8": ln_mod_fp8,
        "residual_ln_mod_fp8": residual_ln_mod_fp8,
        "rows_fp8": rows_fp8,
        "launch_ln_mod_fp8": launch_ln_mod_fp8,
        "launch_residual_ln_mod_fp8": launch_residual_ln_mod_fp8,
        "launch_rows_fp8": launch_rows_fp8,
    }
