"""The kernels package on CPU: the references' arithmetic against diffusers' own modules and torchao's rowwise scale,
the dispatchers falling back to the references off the GPU, and an import that never pulls in triton (the Triton
kernels themselves are checked against the same references on the GPU by bench/fused_blocks.py)."""

from __future__ import annotations

import subprocess
import sys

import torch

from flux_kontext.optimizations import kernels
from flux_kontext.optimizations.gelu_sigmoid_form import tanh_gelu
from flux_kontext.optimizations.kernels import E4M3_MAX, quantize_rowwise_fp8


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.float(), w.float())


def test_reference_quantizes_attention_and_gelu_rows_with_one_scale_per_row():
    g = torch.Generator().manual_seed(0)
    attn, mlp = torch.randn(5, 8, generator=g), torch.randn(5, 24, generator=g) * 4
    mlp[2] = 0.0
    attn[2] = 0.0  # an all-zero row: a floored scale, zeros out, no NaN
    values, scale = kernels.reference_gelu_fp8(attn, mlp)
    assert values.shape == (5, 32) and values.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    row = torch.cat([attn, tanh_gelu(mlp)], dim=-1)
    torch.testing.assert_close(scale[[0, 1, 3, 4]], row.abs().amax(-1, keepdim=True)[[0, 1, 3, 4]] / E4M3_MAX)
    assert torch.all(values[2].float() == 0) and torch.isfinite(scale).all()
    dequantized = values.float() * scale
    # e4m3: 3 mantissa bits (half a step is 2^-4 relative), subnormal steps of 2^-9 below 2^-6 (in scale units)
    assert ((dequantized - row).abs() <= row.abs() * 2**-4 + scale * 2**-9 + 1e-7).all()
    assert values.float().abs().max() == E4M3_MAX  # each row's largest value lands on the top of the range
    gelu_only, _ = kernels.reference_gelu_fp8(None, mlp)
    assert gelu_only.shape == (5, 24)


def test_modulated_layer_norm_reference_is_diffusers_ada_layer_norm_quantized():
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    torch.manual_seed(0)
    norm = AdaLayerNormZeroSingle(64).eval()
    text, image, temb = torch.randn(2, 3, 64), torch.randn(2, 5, 64) * 3, torch.randn(2, 64)
    with torch.inference_mode():
        normed, _ = norm(torch.cat([text, image], dim=1), emb=temb)
        shift, scale, _ = norm.linear(norm.silu(temb)).chunk(3, dim=1)  # the modulation AdaLayerNormZeroSingle applies
        values, row_scale = kernels.reference_ln_mod_fp8(text, image, shift, scale, norm.norm.eps)
    want_values, want_scale = quantize_rowwise_fp8(normed.reshape(-1, 64))
    assert values.shape == (16, 64) and row_scale.shape == (16, 1)
    torch.testing.assert_close(row_scale, want_scale)
    assert (values.float() != want_values.float()).float().mean() < 0.01


def _qkv_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    heads, head_dim, text, image = 2, 32, 3, 5
    first = torch.randn(2, text, 3 * heads * head_dim, generator=g).to(dtype)
    second = torch.randn(2, image, 3 * heads * head_dim, generator=g).to(dtype)
    norms_first = tuple((1 + torch.rand(head_dim, generator=g)).to(dtype) for _ in "qk")
    norms_second = tuple((0.5 + torch.rand(head_dim, generator=g)).to(dtype) for _ in "qk")
    angles = torch.rand(text + image, head_dim // 2, generator=g).repeat_interleave(2, dim=1) * 6.3
    return first, second, norms_first, norms_second, (angles.cos(), angles.sin()), heads, 1e-6


def test_dispatchers_on_cpu_return_the_references_results():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):  # bf16 too: only CUDA bf16 tensors take the kernel
        attn, mlp = torch.randn(2, 3, 8, generator=g).to(dtype), torch.randn(6, 24, generator=g).to(dtype)
        # (batch, tokens, C) attention next to (rows, F) GEMM outputs: one row each
        _assert_same(kernels.gelu_fp8(attn, mlp), kernels.reference_gelu_fp8(attn.reshape(6, 8), mlp))
        values, scale = kernels.gelu_fp8(None, mlp.reshape(2, 3, 24))
        _assert_same((values, scale), kernels.reference_gelu_fp8(None, mlp))
        assert values.shape == (6, 24) and scale.shape == (6, 1)

        first, second = torch.randn(2, 3, 64, generator=g).to(dtype), torch.randn(2, 5, 64, generator=g).to(dtype)
        shift, scale = torch.randn(2, 64, generator=g).to(dtype), torch.randn(2, 64, generator=g).to(dtype)
        for other in (second, None):
            _assert_same(
                kernels.ln_mod_fp8(first, other, shift, scale, 1e-6),
                kernels.reference_ln_mod_fp8(first, other, shift, scale, 1e-6),
            )

        first, second, norms_first, norms_second, rotary, heads, eps = _qkv_inputs(dtype)
        scales = torch.tensor([0.01, 0.02])
        for args in (
            (first, second, norms_first, norms_second, rotary, heads, eps),
            (first, None, norms_first, None, tuple(t[:3] for t in rotary), heads, eps),
        ):
            _assert_same(kernels.qk_norm_rope(*args), kernels.reference_qk_norm_rope(*args))
            got = kernels.qk_norm_rope_fp8(*args, scales)
            _assert_same(got, kernels.reference_qk_norm_rope_fp8(*args, scales))
            assert [t.dtype for t in got] == [torch.float8_e4m3fn] * 3 + [torch.float32]


def test_dispatchers_look_the_reference_up_at_call_time(monkeypatch):
    from flux_kontext.optimizations.kernels import rope

    args, scales = _qkv_inputs(), torch.tensor([0.01, 0.02])
    expected, expected_fp8 = kernels.qk_norm_rope(*args), kernels.qk_norm_rope_fp8(*args, scales)
    real = rope.reference_qk_norm_rope
    # a wrong RoPE (the rotary table shifted by one token), as a test of the blocks swaps in to prove it is not vacuous
    monkeypatch.setattr(
        rope, "reference_qk_norm_rope", lambda *a: real(*a[:4], tuple(t.roll(1, 0) for t in a[4]), *a[5:])
    )
    wrong, wrong_fp8 = kernels.qk_norm_rope(*args), kernels.qk_norm_rope_fp8(*args, scales)
    assert not torch.allclose(wrong[0], expected[0]) and not torch.equal(wrong_fp8[0].float(), expected_fp8[0].float())
    torch.testing.assert_close(wrong[2], expected[2])  # v is not rotated


def test_importing_the_package_does_not_import_triton():
    code = "import flux_kontext.optimizations.kernels, sys; assert 'triton' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
