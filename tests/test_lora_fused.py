"""LoRA's side path inside the fused FP8 blocks (fp8_blocks.fp8_linear / fp8_linears, lora_gemm.py) on the tiny
transformer as the GPU stack leaves it (CPU: the kernels' references and CPU FP8 GEMMs stand in for the GPU's):
against the forward hook's path on the same FP8 layers, scale 0 bit for bit, and under torch.compile; the up
projection folded into the wide GEMMs (lora_k_augment.py) against the exact low-rank product."""

from __future__ import annotations

import pytest
import torch

from flux_kontext.jobs import Job
from flux_kontext.optimizations.fuse_qkv import UNFUSED
from flux_kontext.settings import Settings
from flux_kontext.stack import stack_for
from tests.lora_files import peft_lora
from tests.test_fused_fp8 import HOPPER, _fp8_tiny_transformer, cpu_rowwise_fp8_gemm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused-loras")
    return [f"style={peft_lora(folder / 'style', seed=1)}", f"light={peft_lora(folder / 'light', seed=3, rank=8)}"]


def fused_with_lora(adapters, seed: int = 0, compiled: bool = False, k_augment: bool = False):
    transformer, pipe, kwargs, _ = _fp8_tiny_transformer(seed)
    for module in transformer.modules():  # as fuse_qkv serves it: only the fused q|k|v layers remain
        for name in UNFUSED:
            if isinstance(getattr(module, name, None), torch.nn.Linear):
                setattr(module, name, None)
    names = ["fused_gelu_fp8", "fused_norm_rope", "lora", *(["compile"] if compiled else [])]
    settings = Settings(model="tiny", loras=adapters, lora_max_per_request=2, lora_k_augment=k_augment)
    stack = stack_for(settings, only=names)
    stack.apply(pipe, HOPPER)

    def run(loras=()):
        with stack.request(Job(prompt="x", seed=0, loras=tuple(loras))), torch.inference_mode():
            return transformer(**kwargs)[0].clone()

    return stack, run


def test_fused_blocks_add_the_adapter_from_their_fp8_activations_as_the_layers_hooks_do(adapters):
    stack, run = fused_with_lora(adapters)
    report = stack["lora"].report().public()
    assert report["status"] == "applied", report
    singles = 1  # the tiny transformer's single blocks: each shares one down projection for proj_mlp and to_qkv
    assert f"{singles} shared by two layers" in report["detail"] and "A in e4m3" in report["detail"]
    # The up projection's kernel is chosen by measurement on the GPU; /health says why not here.
    assert report["data"]["up_projection"] == {"kernel": "cublas addmm_", "why": "not a CUDA device"}
    none, zero = run(), run([("style", 0.0), ("light", 0.0)])
    assert torch.equal(zero, none)  # scale 0: the base bit for bit (adapters at scale 0 are left out)
    style, both = run([("style", 1.0)]), run([("style", 1.0), ("light", -0.7)])
    assert torch.equal(run(), none) and torch.equal(run([("style", 1.0)]), style)  # no leakage between requests

    stack.slots.clear_everywhere("body")  # diffusers' forwards on the same FP8 layers: the forward hooks' side path
    hook_none = run()
    assert rel(hook_none, none) < 1e-5  # the same base either way
    for fused, choice in ((style, [("style", 1.0)]), (both, [("style", 1.0), ("light", -0.7)])):
        effect, hook_effect = fused - none, run(choice) - hook_none
        assert rel(fused, none) > 0.05  # the adapter does move the output
        # The fused path's A is in e4m3 (an FP8-sized error on the adapter's contribution only); the hooks' is not.
        assert rel(effect, hook_effect) < 0.15, rel(effect, hook_effect)  # measured 5-6% here


# Compiled against eager: Inductor computes a row's FP8 scale as amax * (1 / 448) where eager divides, one fp32 ulp
# apart; an activation that sits on an e4m3 rounding midpoint then rounds the other way. In the tiny model's
# 2,048-value activations one such flip moves the output by 0.3-0.5% (measured: one flip in to_out's input under
# the fold, 2026-12-02), so compiled and eager agree to a few flips, and compiled code against itself bit for bit.
FEW_FP8_FLIPS = 2e-2


@pytest.mark.parametrize("k_augment", [False, True])
def test_the_fused_side_path_compiles_once_and_a_switch_between_adapters_compiles_nothing(adapters, k_augment):
    from flux_kontext.optimizations.compile import graphs_compiled

    _, eager = fused_with_lora(adapters, seed=1, k_augment=k_augment)
    _, compiled = fused_with_lora(adapters, seed=1, compiled=True, k_augment=k_augment)
    choices = {"none": [], "style": [("style", 1.0)], "light": [("light", 0.5)]}
    expected = {label: eager(choice) for label, choice in choices.items()}
    first = {label: compiled(choices[label]) for label in ("none", "style")}  # both variants compiled (as warm-up)
    before = graphs_compiled()
    for label in ["light", "style", "none", "light"]:
        got = compiled(choices[label])
        assert rel(got, expected[label]) < FEW_FP8_FLIPS, label
        assert label not in first or torch.equal(got, first[label]), label  # no leakage from the previous adapter
        first.setdefault(label, got)
    assert min(rel(expected[label], expected["none"]) for label in ("style", "light")) > 0.05  # adapters do act
    assert graphs_compiled() == before


def test_folding_the_up_projection_into_the_wide_fp8_gemms_adds_the_same_delta(adapters):
    """FLUX_LORA_K_AUGMENT (the default): q|k|v and the MLP-in GEMMs run on [x8 | t'] and [W8 | B']; the others keep
    the in-place up projection. A mild and a strong use of the same adapters (the tiny test adapters at scale 2 are
    far past what t' could hold in e4m3 without the guard) add the in-place path's delta within the same error:
    the guard rescales rows instead of cutting their delta, and /health counts it per adapter."""
    stack, run = fused_with_lora(adapters, k_augment=True)
    report = stack["lora"].report().public()
    folded = report["data"]["k_augmented"]
    # single: q|k|v, MLP in, proj_out; double: q|k|v of both streams, MLP in and out of both, and (FP8 since the
    # fifth session's fixture) to_out and to_add_out
    assert folded == 11 and "folded into the FP8 GEMM" in report["detail"]
    assert "folded into the FP8 GEMM on 11 layers" in report["data"]["adapters"]["style"]["path"]
    _, plain = fused_with_lora(adapters)
    hook_stack, hooks = fused_with_lora(adapters)
    hook_stack.slots.clear_everywhere("body")  # diffusers' forwards: the adapter unquantized, from the layers' inputs
    none, hook_none = run(), hooks()
    assert torch.equal(none, plain())  # without adapters: the plain GEMMs, bit for bit
    assert torch.equal(run([("style", 0.0)]), none)
    errors, exact_errors = {}, {}
    for label, choice in {
        "mild": [("style", 0.02)],
        "mild pair": [("style", 0.02), ("light", -0.015)],
        "strong": [("style", 2.0)],
        "strong pair": [("style", 2.0), ("light", -2.0)],
    }.items():
        effect, in_place_effect = run(choice) - none, plain(choice) - none
        assert rel(run(choice), none) > 0.005  # the adapter does move the output
        # t' and B' in e4m3 too: about two more FP8-sized errors on the adapter's delta than the in-place path
        errors[label] = rel(effect, in_place_effect)
        exact_errors[label] = rel(effect, hooks(choice) - hook_none)
    assert max(errors.values()) < 0.15, errors
    # Against the unquantized side path: the strong uses within the error of the mild ones (no saturation)
    assert max(exact_errors.values()) < 0.2 and exact_errors["strong"] < 2 * exact_errors["mild"], exact_errors
    run()  # the last request's guard counts are read back at the next request
    guard = stack["lora"].report().public()["data"]["fold_guard"]
    assert guard["style"]["rows_rescaled"] > 0 and guard["style"]["entries_clamped"] == 0, guard
    assert torch.equal(run(), none) and torch.equal(run([("style", 0.02)]), run([("style", 0.02)]))  # no leakage


def test_the_fold_stays_within_the_memory_the_plan_leaves(adapters, monkeypatch):
    """The widened weights (W_aug) only where the GPU keeps the memory plan's headroom: with no room beyond it,
    nothing is folded (the in-place path), and /health says why."""
    from flux_kontext.optimizations import lora

    monkeypatch.setattr(lora, "fold_memory", lambda hardware, device: 0)
    stack, run = fused_with_lora(adapters, k_augment=True)
    data = stack["lora"].report().public()["data"]
    assert data["k_augmented"] == 0 and data["k_augment"]["memory"]["folded_mib"] == 0
    assert len(data["k_augment"]["memory"]["not_folded_for_memory"]) == 6  # the six input shapes of the tiny model
    _, plain = fused_with_lora(adapters)
    assert torch.equal(run([("style", 1.0)]), plain([("style", 1.0)]))  # exactly the in-place path


def test_appending_a_s_rows_to_the_weights_computes_the_in_place_path_s_delta(adapters, monkeypatch):
    """Where the fold is not chosen, A's e4m3 rows appended to the layer's FP8 weight give its down projection from
    the same GEMM ([y | x A^T]); the result is the in-place path's (a separate down projection), and /health says how
    many layers run that way. Switching adapters re-quantizes A straight into the combined weight."""
    from flux_kontext.optimizations import lora_k_augment

    monkeypatch.setattr(lora_k_augment, "choose", lambda device, inputs: (dict.fromkeys(inputs), {"why": "test"}))
    stack, run = fused_with_lora(adapters, k_augment=True)
    data = stack["lora"].report().public()["data"]
    assert data["k_augmented"] == 0 and data["rows_appended"] == 9  # all but the single block's shared pair
    assert "9 with the down projection inside the GEMM" in data["adapters"]["style"]["path"]
    _, plain = fused_with_lora(adapters)
    none = run()
    assert torch.equal(none, plain())
    for choice in ([("style", 1.0)], [("light", 0.5)], [("style", 1.0), ("light", -0.7)], [("style", 1.0)]):
        assert rel(run(choice), plain(choice)) < 1e-3, choice  # the same arithmetic, summed in another order
    _, compiled = fused_with_lora(adapters, compiled=True, k_augment=True)  # the strided outputs under compile
    for choice in ([], [("style", 1.0)], [("light", 0.5)]):
        assert rel(compiled(choice), run(choice)) < 1e-5, choice


def _layer(fan_in=64, fan_out=192, rank=16, seed=0):
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8

    generator = torch.Generator().manual_seed(seed)
    weight8, weight_scale = quantize_rowwise_fp8(torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5)
    down8, down_scale = quantize_rowwise_fp8(torch.randn(rank, fan_in, generator=generator) / fan_in**0.5)
    up = torch.randn(fan_out, rank, generator=generator) * 0.06 / rank**0.5
    x8, x_scale = quantize_rowwise_fp8(torch.randn(256, fan_in, generator=generator))
    return weight8.t(), weight_scale.t(), down8, down_scale.view(1, -1), up, x8, x_scale


@pytest.mark.skipif(not cpu_rowwise_fp8_gemm(), reason="this torch's CPU _scaled_mm takes per-tensor scales only")
@pytest.mark.parametrize("strength", [1.0, 40.0, 1e5])
def test_the_folded_gemm_computes_the_low_rank_delta_and_never_cuts_it_silently(strength):
    """One layer: y = sx sw ([x8 | t'] @ [W8 | B']^T) against the base GEMM plus the exact (x A^T) B^T. At 40 times the
    delta t' would saturate e4m3 (most of its entries): the guard rescales those rows and the delta is as exact as
    at 1; at 1e5 (beyond the guard's 2^11) entries are clamped, and counted."""
    from flux_kontext.optimizations import lora_gemm, lora_k_augment

    weight_t, weight_scale, down8, down_scale, up, x8, x_scale = _layer()
    up = up * strength
    rank = up.shape[1]
    folded = lora_k_augment.AugmentedWeight(weight_t, weight_scale, rank, 0, rank, pad=16)
    t_scale = torch.zeros(1, rank)
    folded.fill(up, t_scale)
    low = lora_gemm.down_projection(x8, x_scale, down8, down_scale, torch.float32)
    counters = torch.zeros(2, dtype=torch.int32)
    x_aug, scale = lora_k_augment.augmented_input(x8, x_scale, low, t_scale, counters, folded)
    assert x_aug.shape == (x8.shape[0], x8.shape[1] + rank + 16)  # padded: zero weights
    out = lora_k_augment.augmented_linear(x_aug, scale, folded, None, torch.float32)
    base = torch._scaled_mm(x8, weight_t, scale_a=x_scale, scale_b=weight_scale, out_dtype=torch.float32)
    exact = low @ up.t()  # the same down projection, the up projection in fp32
    rows_rescaled, clamped = counters.tolist()
    saturated = lora_k_augment.saturation(low, x_scale, t_scale)
    if strength <= 40:
        assert rel(out - base, exact) < 0.06, rel(out - base, exact)  # e4m3's rounding of t', B' (and x8's rows)
        assert clamped == 0
    if strength == 40.0:
        assert saturated > 0.1 and rows_rescaled > 0  # without the guard: clamped, the delta cut
    if strength == 1e5:
        assert clamped > 0  # past 2^8 more headroom: cut, but counted (/health's fold_guard)


def test_the_fold_guard_kernel_s_reference_rescales_only_the_rows_that_need_it():
    """lora_fold_input's arithmetic: t' in x_aug's last columns (zeros in the padding), a row whose t' exceeds e4m3
    rescaled by the smallest power of two that fits (x8 / 2^j, its scale * 2^j: the same x), the others untouched."""
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8
    from flux_kontext.optimizations.lora_fold_input import fold_input

    generator = torch.Generator().manual_seed(0)
    x8, sx = quantize_rowwise_fp8(torch.randn(6, 64, generator=generator))
    low = torch.randn(6, 8, generator=generator) * sx  # t = low / sx: about N(0, 1) in FP8 units
    low[2] *= 2000  # about 3,000: needs 2^3 more
    x_aug = torch.full((6, 80), float("nan")).to(torch.float8_e4m3fn)  # garbage where the block left the columns
    x_aug[:, :64] = x8
    scale, counters = sx.clone(), torch.zeros(2, dtype=torch.int32)
    fold_input(x_aug, scale, low, torch.ones(1, 8), counters, 64)
    assert counters.tolist() == [1, 0]
    assert float(scale[2] / sx[2]) in (8.0, 16.0) and torch.equal(scale[[0, 1, 3, 4, 5]], sx[[0, 1, 3, 4, 5]])
    assert torch.equal(x_aug[[0, 1, 3, 4, 5], :64].float(), x8[[0, 1, 3, 4, 5]].float())
    assert rel(x_aug[:, :64].float() * scale, x8.float() * sx) < 1e-3  # the same activations
    assert rel(x_aug[:, 64:72].float() * scale, low) < 0.04 and x_aug[:, 72:].float().eq(0).all()


@pytest.mark.gpu
def test_on_the_gpu_the_folded_gemm_at_flux_widths_adds_the_delta_and_start_up_measures_the_choice():
    """cuBLAS's FP8 GEMM on x_aug at FLUX's q|k|v shape, padded as ``choose`` may pick, against the exact delta."""
    from flux_kontext.optimizations import lora_gemm, lora_k_augment

    parts = _layer(fan_in=3072, fan_out=9216, rank=48)
    weight_t, weight_scale, down8, down_scale, up, x8, x_scale = (t.cuda() for t in parts)
    weight_t = weight_t.t().contiguous().t()  # column-major, as torchao's weight is
    up = up.bfloat16()
    low = lora_gemm.down_projection(x8, x_scale, down8, down_scale, torch.bfloat16)
    base = torch._scaled_mm(x8, weight_t, scale_a=x_scale, scale_b=weight_scale, out_dtype=torch.bfloat16)
    exact = low.float() @ up.float().t()
    for multiple in lora_k_augment.K_MULTIPLES:
        pad = lora_k_augment.padding(3072, 48, multiple)
        folded = lora_k_augment.AugmentedWeight(weight_t, weight_scale, 48, 0, 48, pad)
        t_scale = torch.zeros(1, 48, device="cuda")
        folded.fill(up, t_scale)
        counters = torch.zeros(2, dtype=torch.int32, device="cuda")
        x_aug, scale = lora_k_augment.augmented_input(x8, x_scale, low, t_scale, counters, folded)
        out = lora_k_augment.augmented_linear(x_aug, scale, folded, None, torch.bfloat16)
        assert rel(out.float() - base.float(), exact) < 0.1, multiple  # e4m3's rounding of t' and B'
    chosen, data = lora_k_augment.choose(torch.device("cuda"), {(3072, ((9216, 48),))}, rows=512)
    assert set(data["by_input"]) == {"K3072:9216x48"} and (3072, ((9216, 48),)) in chosen


def test_the_fold_writes_t_in_copies_where_the_padding_leaves_room_each_with_half_the_value():
    """With two copies of t' (each t / 2, the 1/2 in t_scale as AugmentedWeight.fill writes it) a row whose t is
    1.5x e4m3's largest value fits without the guard; with one copy it is rescaled. W_aug holds B' in both copies, so
    the folded GEMM adds the same delta either way."""
    from flux_kontext.optimizations import lora_k_augment
    from flux_kontext.optimizations.kernels.e4m3 import quantize_rowwise_fp8
    from flux_kontext.optimizations.lora_fold_input import fold_input

    generator = torch.Generator().manual_seed(5)
    x8, sx = quantize_rowwise_fp8(torch.randn(4, 64, generator=generator))
    low = torch.randn(4, 8, generator=generator) * sx * 100
    low[1, 3] = 1.5 * 448 * sx[1, 0]  # t = 672 in row 1
    results = {}
    for copies in (1, 2):
        x_aug = torch.full((4, 80), float("nan")).to(torch.float8_e4m3fn)
        x_aug[:, :64] = x8
        scale, counters = sx.clone(), torch.zeros(2, dtype=torch.int32)
        fold_input(x_aug, scale, low, torch.full((1, 8), 1 / copies), counters, 64, copies)
        results[copies] = (x_aug.float(), scale, counters.tolist())
    assert results[1][2] == [1, 0] and results[2][2] == [0, 0]  # the copies' room: no row rescaled
    x_aug, scale, _ = results[2]
    assert torch.equal(x_aug[:, 64:72], x_aug[:, 72:80]) and torch.equal(scale, sx)
    assert rel(2 * x_aug[:, 64:72] * scale, low) < 0.04  # both copies together: t'

    weight_t, weight_scale, _, _, up, _, _ = _layer(rank=8)
    for pad, copies in ((8, 2), (24, 4), (0, 1)):
        folded = lora_k_augment.AugmentedWeight(weight_t, weight_scale, 8, 0, 8, pad)
        assert folded.copies == copies and folded.input_width == weight_t.shape[0] + 8 + pad
        t_scale = torch.zeros(1, 8)
        folded.fill(up, t_scale)
        b8 = folded.weight[:, weight_t.shape[0] :].float()
        assert all(torch.equal(b8[:, c * 8 : c * 8 + 8], b8[:, :8]) for c in range(copies))
        assert b8[:, copies * 8 :].eq(0).all() and float(b8.abs().max()) == 448.0  # B' at e4m3's largest value


def test_the_fold_width_is_the_one_with_most_copies_among_those_timed_as_fast():
    """Start-up times each x_aug width; within a few percent of the fastest (timing noise), more t' copies win (they
    spare the guard's rescaling, which the timing does not see); a clearly slower width never wins."""
    from flux_kontext.optimizations.lora_k_augment import _widest_within_noise

    # the single blocks' shared input: 64 t' columns after K = 3072 (measured on the H200, 2026-12-02)
    assert _widest_within_noise({3136: 0.5577, 3200: 0.556, 3328: 0.569}, 3072, 64) == 3328  # 4 copies, +2.3%
    assert _widest_within_noise({3136: 0.5172, 3200: 0.5412, 3328: 0.5597}, 3072, 64) == 3136  # +4.6%: slower
    assert _widest_within_noise({3088: 0.2, 3136: 0.2}, 3072, 16) == 3136  # ties: the copies
