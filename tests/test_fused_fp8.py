"""One-pass GELU + rowwise FP8 quantization: its arithmetic, and the blocks wired through it (CPU: the reference
arithmetic and CPU FP8 GEMMs stand in for the Triton kernel, which bench/cuda_graph_probe.py checks on the GPU)."""

from __future__ import annotations

import types

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

from flux_kontext.optimizations import OptimizationContext
from flux_kontext.optimizations.activation import tanh_gelu
from flux_kontext.optimizations.fused_fp8 import apply, reference, replace, single_block_forward
from flux_kontext.optimizations.quantization import E4M3_MAX as FP8_MAX
from flux_kontext.optimizations.quantization import quantize_rowwise_fp8
from flux_kontext.settings import Settings
from tests.test_optimizations import tiny_pipe_with_reference


def test_reference_quantizes_attention_and_gelu_rows_with_one_scale_per_row():
    g = torch.Generator().manual_seed(0)
    attn, mlp = torch.randn(5, 8, generator=g), torch.randn(5, 24, generator=g) * 4
    mlp[2] = 0.0
    attn[2] = 0.0  # an all-zero row: a floored scale, zeros out, no NaN
    values, scale = reference(attn, mlp)
    assert values.shape == (5, 32) and values.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    row = torch.cat([attn, tanh_gelu(mlp)], dim=-1)
    torch.testing.assert_close(scale[[0, 1, 3, 4]], row.abs().amax(-1, keepdim=True)[[0, 1, 3, 4]] / FP8_MAX)
    assert torch.all(values[2].float() == 0) and torch.isfinite(scale).all()
    dequantized = values.float() * scale
    # e4m3: 3 mantissa bits (half a step is 2^-4 relative), subnormal steps of 2^-9 below 2^-6 (in scale units)
    assert ((dequantized - row).abs() <= row.abs() * 2**-4 + scale * 2**-9 + 1e-7).all()
    assert values.float().abs().max() == FP8_MAX  # each row's largest value lands on the top of the range
    gelu_only, _ = reference(None, mlp)
    assert gelu_only.shape == (5, 24)


@torch.inference_mode()
def test_single_block_through_the_fused_path_matches_the_block_with_fake_quantized_proj_out():
    torch.manual_seed(0)
    block = FluxSingleTransformerBlock(dim=64, num_attention_heads=2, attention_head_dim=32).eval()
    weight_q, weight_scale = quantize_rowwise_fp8(block.proj_out.weight.detach())
    block.proj_out.register_buffer("fp8_weight_t", weight_q.t(), persistent=False)
    block.proj_out.register_buffer("fp8_weight_scale", weight_scale.t(), persistent=False)
    g = torch.Generator().manual_seed(1)
    hidden, encoder, temb = torch.randn(1, 24, 64, generator=g), torch.randn(1, 8, 64, generator=g), torch.randn(1, 64)
    encoder_out, hidden_out = single_block_forward(block, hidden, encoder, temb)

    # Expected: diffusers' own forward, proj_out with the dequantized weight and its input quantized rowwise.
    block.proj_out.weight.copy_(weight_q.float() * weight_scale)
    block.proj_out.register_forward_pre_hook(
        lambda _, args: (lambda q, s: q.float() * s)(*quantize_rowwise_fp8(args[0]))
    )
    expected_encoder, expected_hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb)
    assert encoder_out.shape == (1, 8, 64) and hidden_out.shape == (1, 24, 64)
    torch.testing.assert_close(hidden_out, expected_hidden, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(encoder_out, expected_encoder, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(hidden_out, hidden, atol=1e-3)  # the block did something


def test_only_rowwise_fp8_layers_are_rerouted_and_only_on_the_gpu():
    pipe, _, _ = tiny_pipe_with_reference(0)
    assert replace(pipe.transformer) == 0  # bf16/fp32 weights: nothing to feed
    assert apply(pipe, OptimizationContext("cpu", None, Settings(model="tiny"))).status == "skipped"
    off = apply(pipe, OptimizationContext("cuda", (9, 0), Settings(model="tiny", fused_gelu_fp8=False)))
    assert off.status == "skipped" and "FLUX_FUSED_GELU_FP8" in off.detail


@torch.inference_mode()
def test_undo_sends_the_rerouted_block_back_to_diffusers_forward(monkeypatch):
    from flux_kontext.optimizations import fused_fp8

    torch.manual_seed(0)
    block = FluxSingleTransformerBlock(dim=64, num_attention_heads=2, attention_head_dim=32).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 24, 64), encoder_hidden_states=torch.randn(1, 8, 64), temb=torch.randn(1, 64)
    )
    expected = block(**inputs)
    monkeypatch.setattr(fused_fp8, "_ACTIVE", True)
    block.forward = types.MethodType(single_block_forward, block)  # no FP8 buffers: the fused path would fail
    fused_fp8.undo()
    for got, want in zip(block(**inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
