"""The fused FP8 blocks: the kernels' reference arithmetic against diffusers' own modules, and the blocks wired
through them against diffusers' forwards (CPU: the reference arithmetic and CPU FP8 GEMMs stand in for the Triton
kernels, which bench/fused_blocks.py checks against the same references on the GPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

from flux_kontext.optimizations.attention.kernels import FA3_FP8, KernelChoice, fa3_fp8, sdpa
from flux_kontext.optimizations.attention.processor import install, register_fp8_qk_scales
from flux_kontext.optimizations.fp8_blocks import single_block_forward
from flux_kontext.optimizations.kernels import quantize_rowwise_fp8
from flux_kontext.settings import Settings
from flux_kontext.stack import Hardware, stack_for
from tests.test_optimizations import tiny_pipe_with_reference

HOPPER = Hardware("cuda", (9, 0))  # the fused path is decided for a GPU; on CPU tensors it runs the references


def fused_stack(pipe, **settings):
    """The two fused optimizations applied to ``pipe`` as the GPU stack would (the kernels' references on CPU)."""
    stack = stack_for(Settings(model="tiny", **settings), only=["fused_gelu_fp8", "fused_norm_rope"])
    stack.apply(pipe, HOPPER)
    return stack


def statuses(stack) -> dict:
    return {r.name: (r.status, r.detail, dict(r.data)) for r in stack.reports()}


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
    pipe, kwargs, reference = tiny_pipe_with_reference(0)
    bf16 = statuses(fused_stack(pipe))  # bf16/fp32 weights: nothing to feed
    assert bf16["fused_gelu_fp8"][:2] == ("skipped", "no rowwise-FP8 MLP output layer to feed (FP8 not applied)")
    assert bf16["fused_norm_rope"][0] == "skipped" and "needs fused_gelu_fp8" in bf16["fused_norm_rope"][1]
    torch.testing.assert_close(pipe.transformer(**kwargs)[0], reference, rtol=0, atol=0)
    cpu = stack_for(Settings(model="tiny"), only=["fused_gelu_fp8", "fused_norm_rope"])
    cpu.apply(pipe, Hardware("cpu"))
    assert [r.status for r in cpu.reports()] == ["skipped"] * 2
    off = statuses(fused_stack(pipe, fused_gelu_fp8=False))
    assert "FLUX_FUSED_GELU_FP8=false" in off["fused_gelu_fp8"][1]
    assert "needs FLUX_FUSED_GELU_FP8=true" in off["fused_norm_rope"][1]


@torch.inference_mode()
def test_undo_sends_the_rerouted_blocks_back_to_diffusers_forward():
    transformer, pipe, kwargs, expected = _fp8_tiny_transformer(3)
    stack = fused_stack(pipe)
    fused = transformer(**kwargs)[0]
    assert [r.status for r in stack.reports()] == ["applied", "applied"]
    for name in ("fused_norm_rope", "fused_gelu_fp8"):
        stack[name].undo()
    # diffusers' forward on the fake-FP8 layers computes the same as the fused path (test below), so undo is shown
    # by breaking the fused path's reference kernel: after undo it is never called.
    from flux_kontext.optimizations.kernels import gelu

    real, gelu.reference_gelu_fp8 = gelu.reference_gelu_fp8, None
    try:
        restored = transformer(**kwargs)[0]
    finally:
        gelu.reference_gelu_fp8 = real
    torch.testing.assert_close(restored, expected, rtol=0, atol=0)
    assert float((fused - expected).norm() / expected.norm()) < 1e-5


def _fake_fp8(linear: torch.nn.Linear) -> None:
    """Give a Linear what the fused path reads (rowwise e4m3 weight and scales) and make its own forward compute the
    same: dequantized weight, input quantized rowwise (what torchao's FP8 layer does)."""
    weight_q, weight_scale = quantize_rowwise_fp8(linear.weight.detach())
    linear.register_buffer("fp8_weight_t", weight_q.t(), persistent=False)
    linear.register_buffer("fp8_weight_scale", weight_scale.t(), persistent=False)
    linear.weight.data.copy_(weight_q.float() * weight_scale)
    linear.register_forward_pre_hook(lambda _, args: (lambda q, s: q.float() * s)(*quantize_rowwise_fp8(args[0])))


def cpu_rowwise_fp8_gemm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes rowwise scales (2.13's CPU build does; a CUDA build of 2.11 on a
    GPU machine takes per-tensor scales only on CPU tensors)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _fp8_tiny_transformer(seed: int):
    """The tiny transformer as the GPU stack leaves it (fused QKV, our attention processor, FP8 on every layer the
    fused blocks feed), its inputs, and its output through diffusers' block forwards."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    if not cpu_rowwise_fp8_gemm():
        pytest.skip(f"torch {torch.__version__}: CPU _scaled_mm takes per-tensor scales only (references need rowwise)")

    pipe, kwargs, _ = tiny_pipe_with_reference(seed)
    transformer = pipe.transformer
    transformer.fuse_qkv_projections()
    for block in transformer.single_transformer_blocks:
        for linear in (block.proj_mlp, block.attn.to_qkv, block.proj_out, block.norm.linear):
            _fake_fp8(linear)
    for block in transformer.transformer_blocks:
        for linear in (
            block.norm1.linear,  # the modulations: quantized by the fused blocks themselves (fp8_blocks._modulation)
            block.norm1_context.linear,
            block.attn.to_qkv,
            block.attn.to_added_qkv,
            block.attn.to_out[0],
            block.attn.to_add_out,
            *(ff.net[i].proj if i == 0 else ff.net[i] for ff in (block.ff, block.ff_context) for i in (0, 2)),
        ):
            _fake_fp8(linear)
    transformer.set_attn_processor(FluxAttnProcessor())
    with torch.inference_mode():
        expected = transformer(**kwargs)[0]
    install(transformer, KernelChoice(kernels={"sdpa": sdpa}))
    return transformer, pipe, kwargs, expected


@torch.inference_mode()
def test_whole_blocks_on_the_fused_path_compute_what_diffusers_blocks_compute():
    transformer, pipe, kwargs, expected = _fp8_tiny_transformer(0)
    reports = statuses(fused_stack(pipe))
    blocks = len(transformer.single_transformer_blocks), len(transformer.transformer_blocks)
    assert reports["fused_gelu_fp8"][2] == {"mlp_outputs": blocks[0] + 2 * blocks[1]}
    counts = {k: reports["fused_norm_rope"][2][k] for k in ("mlp_outputs", "single_blocks", "double_blocks")}
    assert counts == {
        "mlp_outputs": blocks[0] + 2 * blocks[1],
        "single_blocks": blocks[0],
        "double_blocks": blocks[1],
    }
    ours = transformer(**kwargs)[0]
    assert ours.shape == expected.shape and expected.abs().max() > 0
    # The same arithmetic in fp32, the same FP8 roundings: equal up to fp32 summation order.
    assert float((ours - expected).norm() / expected.norm()) < 1e-5
    # Not vacuous: a wrong RoPE (the rotary table shifted by one token) changes the result.
    cos, sin = transformer.pos_embed(torch.cat([kwargs["txt_ids"], kwargs["img_ids"]]))
    from flux_kontext.optimizations.kernels import rope

    real = rope.reference_qk_norm_rope
    rope.reference_qk_norm_rope = lambda *a: real(*a[:4], tuple(t.roll(1, 0) for t in a[4]), *a[5:])
    try:
        wrong = transformer(**kwargs)[0]
    finally:
        rope.reference_qk_norm_rope = real
    assert float((wrong - expected).norm() / expected.norm()) > 1e-3
    assert cos.shape[0] == kwargs["txt_ids"].shape[0] + kwargs["img_ids"].shape[0]


@torch.inference_mode()
def test_double_blocks_quantize_their_attention_output_once_and_fuse_the_residual_into_the_layer_norm():
    from flux_kontext.optimizations.kernels import layer_norm

    transformer, pipe, kwargs, expected = _fp8_tiny_transformer(4)
    fused_stack(pipe)
    calls = {"rows": 0, "residual": 0}
    real_rows, real_residual = layer_norm.reference_rows_fp8, layer_norm.reference_residual_ln_mod_fp8

    def rows(x):
        calls["rows"] += 1
        return real_rows(x)

    def residual(*args):
        calls["residual"] += 1
        return real_residual(*args)

    layer_norm.reference_rows_fp8, layer_norm.reference_residual_ln_mod_fp8 = rows, residual
    try:
        ours = transformer(**kwargs)[0]
        # A layer kept in bf16 (the FP8 screen's choice): that block's output projections run their own forwards.
        first = transformer.transformer_blocks[0].attn.to_add_out
        del first.fp8_weight_t, first.fp8_weight_scale
        calls_before = dict(calls)
        mixed = transformer(**kwargs)[0]
    finally:
        layer_norm.reference_rows_fp8, layer_norm.reference_residual_ln_mod_fp8 = real_rows, real_residual
    double = len(transformer.transformer_blocks)
    # one quantization of the joint (text, image) rows per double block; the gated residual fused per stream
    assert calls_before == {"rows": double, "residual": 2 * double}
    assert calls["rows"] - calls_before["rows"] == double - 1
    for result in (ours, mixed):  # the same arithmetic as diffusers' blocks on the fake-FP8 layers
        assert float((result - expected).norm() / expected.norm()) < 1e-5


@torch.inference_mode()
def test_single_blocks_with_the_residual_in_the_output_gemm_compute_what_diffusers_blocks_compute():
    from flux_kontext.optimizations.kernels import gemm_residual

    transformer, pipe, kwargs, expected = _fp8_tiny_transformer(5)
    reports = statuses(fused_stack(pipe))
    # decided at start on the GPU only (here the weights are on the CPU): off, and said so
    assert reports["fused_norm_rope"][2]["proj_out_residual_epilogue"] == {"use": False, "why": "weights not on a GPU"}
    blocks = transformer.single_transformer_blocks
    assert not any(block.proj_out.fp8_residual_epilogue for block in blocks)
    calls = []
    real = gemm_residual.reference_fp8_gemm_gated_residual

    def counted(*args):
        calls.append(args[5].shape)
        return real(*args)

    for block in blocks:  # what a measurement that found it right and fast sets
        block.proj_out.fp8_residual_epilogue = True
    gemm_residual.reference_fp8_gemm_gated_residual = counted
    try:
        ours = transformer(**kwargs)[0]
    finally:
        gemm_residual.reference_fp8_gemm_gated_residual = real
    assert len(calls) == len(blocks)  # each single block's proj_out, through the op (its CPU arithmetic)
    assert float((ours - expected).norm() / expected.norm()) < 1e-5


def test_the_fused_gemm_op_traces_as_it_runs():
    from flux_kontext.optimizations.kernels import gemm_residual, quantize_rowwise_fp8

    if not cpu_rowwise_fp8_gemm():
        pytest.skip(f"torch {torch.__version__}: CPU _scaled_mm takes per-tensor scales only")
    g = torch.Generator().manual_seed(6)
    values, scale = quantize_rowwise_fp8(torch.randn(12, 32, generator=g))
    weight, weight_scale = quantize_rowwise_fp8(torch.randn(16, 32, generator=g))
    first, second = torch.randn(1, 4, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    args = (
        values,
        scale,
        weight.t(),
        weight_scale.t(),
        torch.randn(16, generator=g),
        first,
        second,
        torch.randn(1, 16),
    )
    torch.library.opcheck(gemm_residual.fp8_gemm_gated_residual, args, test_utils=("test_faketensor",))
    out = gemm_residual.fp8_gemm_gated_residual(*args)
    assert out.shape == (1, 12, 16)
    dequantized = (values.float() * scale) @ (weight.float() * weight_scale).t() + args[4]
    expected = torch.cat([first, second], dim=1) + args[7][:, None] * dequantized
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_block_with_a_layer_kept_in_bf16_keeps_the_path_below_it():
    transformer, pipe, _, _ = _fp8_tiny_transformer(1)
    first = transformer.single_transformer_blocks[0]
    del first.attn.to_qkv.fp8_weight_t, first.attn.to_qkv.fp8_weight_scale  # kept in bf16 by the FP8 screen
    first.attn.to_qkv.weight = torch.nn.Parameter(first.attn.to_qkv.weight.detach().clone())
    reports = statuses(fused_stack(pipe))
    # That block keeps the GELU kernel (its MLP output is still counted) but not the whole-block path.
    assert reports["fused_norm_rope"][2]["single_blocks"] == len(transformer.single_transformer_blocks) - 1
    assert reports["fused_gelu_fp8"][2]["mlp_outputs"] == len(transformer.single_transformer_blocks) + 2 * len(
        transformer.transformer_blocks
    )


def test_settings_refuse_whole_block_fusion_without_the_gelu_kernel():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs FLUX_FUSED_GELU_FP8=true"):
        Settings(model="tiny", fused_gelu_fp8=False, fused_norm_rope=True)
    assert not Settings(model="tiny", fused_gelu_fp8=False).fused_gelu_fp8  # the default adapts


def test_static_fp8_scales_bound_rms_normed_rotated_q_and_k():
    from flux_kontext.optimizations.attention.processor import fp8_qk_scales
    from flux_kontext.optimizations.kernels import reference_qk_norm_rope

    g = torch.Generator().manual_seed(0)
    heads, head_dim, tokens = 2, 32, 12
    qkv = torch.randn(1, tokens, 3 * heads * head_dim, generator=g)
    qkv[0, 3, :head_dim] = 0.0
    qkv[0, 3, 0] = 50.0  # one head whose energy sits in one channel: the bound is reached
    norms = (1 + torch.rand(head_dim, generator=g), 0.5 + torch.rand(head_dim, generator=g))
    angles = torch.rand(tokens, head_dim // 2, generator=g).repeat_interleave(2, dim=1) * 6.3
    rotary = (angles.cos(), angles.sin())
    scales = fp8_qk_scales([norms[0]], [norms[1]], head_dim)
    torch.testing.assert_close(scales, torch.stack([w.abs().max() for w in norms]) * head_dim**0.5 / 448)
    q, k, v = reference_qk_norm_rope(qkv, None, norms, None, rotary, heads, 1e-6)
    q8, k8, v8 = reference_qk_norm_rope(qkv, None, norms, None, rotary, heads, 1e-6, fp8_scales=scales)
    assert q8.dtype == k8.dtype == torch.float8_e4m3fn and v8.dtype == qkv.dtype
    for full, quantized, scale in ((q, q8, scales[0]), (k, k8, scales[1])):
        assert (full.abs() / scale).max() <= 448 * (1 + 1e-5)  # within range: nothing clamped
        dequantized = quantized.float() * scale
        assert ((dequantized - full).abs() <= full.abs() * 2**-4 + scale * 2**-9 + 1e-7).all()
    assert float(q8[0, 3, 0].float().abs().max()) > 100  # the concentrated head uses the top of the range
    torch.testing.assert_close(v8, v)


@torch.inference_mode()
def test_fp8_attention_path_hands_e4m3_q_k_v_and_their_descales_to_the_fp8_kernel():
    transformer, pipe, kwargs, expected = _fp8_tiny_transformer(2)
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    calls = []

    def fp8_call(q8, k8, v8, q_descale, k_descale, v_descale):  # FA3 FP8 emulated, each call recorded
        calls.append((q8.dtype, k8.dtype, v8.dtype, tuple(q_descale.shape), tuple(v_descale.shape)))
        return _emulated_flash_attn_func(q8, k8, v8, q_descale, k_descale, v_descale)

    def fp8_kernel(q, k, v):
        raise AssertionError("the fused blocks call fp8_call directly")

    fp8_kernel.fp8_call = fp8_call
    choice = KernelChoice(kernels={"sdpa": sdpa, FA3_FP8: fp8_kernel}, active=FA3_FP8, fallback="sdpa")
    install(transformer, choice)
    assert register_fp8_qk_scales(transformer) == blocks  # what attention does when FA3 in FP8 is usable
    fused_stack(pipe)
    ours = transformer(**kwargs)[0]
    assert len(calls) == blocks and set(calls) == {(torch.float8_e4m3fn,) * 3 + ((1, 2), (1, 2))}
    error = float((ours - expected).norm() / expected.norm())
    assert 1e-5 < error < 5e-2  # e4m3 attention inputs: a small, non-zero error
    with choice.use(choice.fallback):  # use_flash_attention: false -> bf16 (here fp32) attention again
        assert not choice.fp8
        assert float((transformer(**kwargs)[0] - expected).norm() / expected.norm()) < 1e-5


def test_settings_refuse_fp8_attention_without_fa3():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="FLUX_ATTENTION=cudnn excludes it"):
        Settings(model="tiny", attention="cudnn", fp8_attention=True)
    with pytest.raises(ValidationError, match="needs a Hopper GPU"):
        Settings(model="tiny", device="cpu", fp8_attention=True)
    assert Settings(model="tiny").fp8_attention == "auto"  # used where the start-up measurement allows it
    assert Settings(model="tiny", fp8_attention="false").fp8_attention == "off"
    assert Settings(model="tiny", fp8_attention=True).fp8_attention == "on"
    assert Settings(model="tiny", attention="cudnn").fp8_attention == "auto"  # auto adapts: no error


def _emulated_flash_attn_func(q8, k8, v8, q_descale, k_descale, v_descale):
    """FA3's FP8 forward emulated on CPU: dequantize the e4m3 inputs with their (batch, heads) descales, attend."""
    return sdpa(*(t.float() * d[:, None, :, None] for t, d in ((q8, q_descale), (k8, k_descale), (v8, v_descale))))


@torch.inference_mode()
def test_start_up_screen_measures_fp8_attention_layer_by_layer():
    from flux_kontext.optimizations.attention.fp8_screen import screen_fp8_attention

    pipe, _, _ = tiny_pipe_with_reference(0)
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    fp8_kernel = fa3_fp8(_emulated_flash_attn_func)  # our quantization (static q/k scales, v per head), FA3 emulated
    choice = KernelChoice(kernels={"sdpa": sdpa, FA3_FP8: fp8_kernel}, active="sdpa", fallback="sdpa")
    install(pipe.transformer, choice)
    assert register_fp8_qk_scales(pipe.transformer) == blocks
    screen = screen_fp8_attention(pipe.transformer, choice)
    assert screen["layers"] == blocks and choice.active == "sdpa" and set(choice.kernels) == {"sdpa", FA3_FP8}
    assert 1e-3 < screen["layer_error_median"] <= screen["layer_error_max"] < 0.06  # e4m3: a few percent per layer
    assert 0 < screen["output_error"] < screen["layer_error_max"]
    # A broken kernel: the transformer output barely notices on random weights, the per-layer errors do.
    choice.kernels[FA3_FP8] = lambda q, k, v, attn=None: torch.zeros_like(q)
    broken = screen_fp8_attention(pipe.transformer, choice)
    assert broken["layer_error_max"] == 1.0 and broken["output_error"] < 0.1
