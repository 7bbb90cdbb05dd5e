"""FA3-in-FP8 policy and screen on CPU: which layers and steps run FP8, what the screen measures at several sigmas,
and what /health reports. FA3 itself needs a Hopper GPU, so its FP8 call is emulated (dequantize, then attend)
or replaced by a recording fake at the kernel interface."""

from __future__ import annotations

import types

import pytest
import torch

from flux_kontext.optimizations.attention import Selection
from flux_kontext.optimizations.attention.fp8_policy import (
    Fp8Policy,
    fp8_verdict,
    install_sigma_switch,
    mark_bf16_layers,
    number_attention_layers,
)
from flux_kontext.optimizations.attention.fp8_screen import SCREEN_SIGMAS, screen_fp8_attention
from flux_kontext.optimizations.attention.kernels import FA3_FP8, KernelChoice, fa3_fp8, sdpa
from flux_kontext.optimizations.attention.processor import install, register_fp8_qk_scales
from flux_kontext.settings import Settings
from flux_kontext.stack import Hardware, Optimization, Outcome, Stack, stack_for
from tests.test_fused_fp8 import _emulated_flash_attn_func
from tests.test_optimizations import tiny_pipe_with_reference


def settings(**values) -> Settings:
    return Settings(model="tiny", cuda_graphs=False, **values)


def recording(name: str, calls: list):
    """A kernel that attends with SDPA and records which layer called it."""

    def kernel(q, k, v, attn=None):
        calls.append((name, getattr(attn, "fp8_layer_index", None)))
        return sdpa(q, k, v)

    kernel.takes_module = True
    return kernel


def routed(choice_kwargs: dict, **forward) -> tuple[list, int]:
    """Run the tiny transformer once with FP8 active under a policy; returns (kernel calls, layers)."""
    pipe, kwargs, _ = tiny_pipe_with_reference(0)
    calls: list = []
    kernels = {"fa3": recording("bf16", calls), FA3_FP8: recording("fp8", calls), "sdpa": sdpa}
    choice = KernelChoice(kernels=kernels, active=FA3_FP8, fallback="sdpa", bf16="fa3", **choice_kwargs)
    install(pipe.transformer, choice)
    layers = number_attention_layers(pipe.transformer)
    mark_bf16_layers(pipe.transformer, choice.policy)
    handle = install_sigma_switch(pipe.transformer, choice) if choice.policy.per_step else None
    with torch.inference_mode():
        pipe.transformer(**{**kwargs, **forward})
    if handle is not None:
        handle.remove()
    return calls, layers


# --- the policy ------------------------------------------------------------------------------------------------


def test_policy_resolves_indices_from_the_end_and_reports_those_out_of_range():
    policy = Fp8Policy.from_settings(settings(fp8_attention_bf16_blocks="0,1,-1,99"), layers=57)
    assert policy.bf16_layers == {0, 1, 56} and policy.ignored == (99,)
    assert policy.describe() == {"bf16_layers": [0, 1, 56], "bf16_below_sigma": 0.0, "ignored_indices": [99]}
    assert not policy.fp8_at(0) and not policy.fp8_at(56) and policy.fp8_at(2)
    late = Fp8Policy(bf16_below_sigma=0.3)
    assert late.fp8_at(5, 0.7) and not late.fp8_at(5, 0.1) and late.per_step


def test_settings_read_the_policy_and_refuse_a_per_step_switch_under_cuda_graphs(monkeypatch):
    monkeypatch.setenv("FLUX_FP8_ATTENTION_BF16_BLOCKS", "[0, -1]")
    monkeypatch.setenv("FLUX_FP8_ATTENTION_BF16_BELOW_SIGMA", "0.25")
    monkeypatch.setenv("FLUX_CUDA_GRAPHS", "false")
    loaded = Settings(model="tiny")
    assert loaded.fp8_attention_bf16_blocks == [0, -1] and loaded.fp8_attention_bf16_below_sigma == 0.25
    monkeypatch.setenv("FLUX_CUDA_GRAPHS", "true")
    with pytest.raises(ValueError, match="FLUX_CUDA_GRAPHS=false"):
        Settings(model="tiny")
    assert Settings(model="tiny", fp8_attention_bf16_below_sigma=0).fp8_attention_bf16_below_sigma == 0


def screen_with(errors_by_sigma: dict[float, list[float]]) -> dict:
    return {"sigmas": list(errors_by_sigma), "layer_errors": list(errors_by_sigma.values())}


def test_verdict_counts_only_the_pairs_served_in_fp8():
    # layer 0 and the low-noise step are bad; the rest are fine
    screen = screen_with({1.0: [0.09, 0.02, 0.03], 0.7: [0.08, 0.02, 0.04], 0.1: [0.2, 0.07, 0.05]})
    everything = fp8_verdict(screen, Fp8Policy(), "auto", 0.06)
    assert not everything["use"] and everything["served_error_max"] == 0.2
    first_layer = fp8_verdict(screen, Fp8Policy(frozenset({0})), "auto", 0.06)
    assert not first_layer["use"] and first_layer["served_error_max"] == 0.07  # the late step still fails
    both = fp8_verdict(screen, Fp8Policy(frozenset({0}), bf16_below_sigma=0.3), "auto", 0.06)
    assert both == {"use": True, "served_error_max": 0.04, "limit": 0.06}
    forced = fp8_verdict(screen, Fp8Policy(), "on", 0.06)
    assert forced["use"] and forced["limit"] is None and forced["served_error_max"] == 0.2


# --- the kernel choice follows it -----------------------------------------------------------------------------


def test_chosen_layers_run_bf16_and_the_rest_fp8():
    # the tiny model: one double block (layer 0), one single block (layer 1); keep the last in bf16
    policy = Fp8Policy.from_settings(settings(fp8_attention_bf16_blocks="-1"), layers=2)
    calls, layers = routed({"policy": policy}, timestep=torch.tensor([0.7]))
    assert layers == 2 and calls == [("fp8", 0), ("bf16", 1)]


def test_low_noise_steps_run_bf16_everywhere():
    policy = Fp8Policy(bf16_below_sigma=0.3)
    late, layers = routed({"policy": policy}, timestep=torch.tensor([0.1]))
    early, _ = routed({"policy": policy}, timestep=torch.tensor([0.9]))
    assert {name for name, _ in late} == {"bf16"} and len(late) == layers
    assert {name for name, _ in early} == {"fp8"} and len(early) == layers


def test_per_request_fallback_still_turns_fp8_off():
    pipe, kwargs, _ = tiny_pipe_with_reference(0)
    calls: list = []
    choice = KernelChoice(
        kernels={"fa3": recording("bf16", calls), FA3_FP8: recording("fp8", calls), "sdpa": recording("sdpa", calls)},
        active=FA3_FP8,
        fallback="sdpa",
        bf16="fa3",
    )
    install(pipe.transformer, choice)
    number_attention_layers(pipe.transformer)
    with torch.inference_mode(), choice.use(choice.fallback):  # use_flash_attention: false
        pipe.transformer(**kwargs)
    assert {name for name, _ in calls} == {"sdpa"}


# --- the screen at several sigmas ----------------------------------------------------------------------------


@torch.inference_mode()
def test_screen_measures_every_layer_at_several_sigmas():
    pipe, _, _ = tiny_pipe_with_reference(0)
    choice = KernelChoice(kernels={"sdpa": sdpa, FA3_FP8: fa3_fp8(_emulated_flash_attn_func)}, active="sdpa")
    install(pipe.transformer, choice)
    layers = register_fp8_qk_scales(pipe.transformer)
    screen = screen_fp8_attention(pipe.transformer, choice)
    assert screen["sigmas"] == list(SCREEN_SIGMAS) and len(SCREEN_SIGMAS) >= 3
    assert SCREEN_SIGMAS[0] == 1.0 and min(SCREEN_SIGMAS) <= 0.2  # the first step and a late, low-noise one
    assert [entry["sigma"] for entry in screen["per_sigma"]] == list(SCREEN_SIGMAS)
    assert len(screen["layer_errors"]) == len(SCREEN_SIGMAS) and all(len(e) == layers for e in screen["layer_errors"])
    assert len(screen["per_layer_max"]) == layers and screen["layers"] == layers
    # the time embedding modulates every block: the errors differ from sigma to sigma
    assert len({tuple(errors) for errors in screen["layer_errors"]}) == len(SCREEN_SIGMAS)
    assert screen["layer_error_max"] == max(screen["per_layer_max"]) == screen["worst"][0]["error"]
    assert all(1e-4 < entry["layer_error_median"] < 0.06 for entry in screen["per_sigma"])  # e4m3: a few percent
    assert choice.active == "sdpa" and set(choice.kernels) == {"sdpa", FA3_FP8}


# --- what /health shows -----------------------------------------------------------------------------------------


class ScreenedAttention(Optimization):
    """Stands in for attention's GPU path: FA3 in FP8 chosen after a screen, under a policy."""

    name = "attention"

    def __init__(self, settings, screen: dict, policy: Fp8Policy):
        super().__init__(settings)
        self.screen, self.policy_ = screen, policy

    def apply(self, model) -> Outcome:
        self.choice = KernelChoice(kernels={}, active=FA3_FP8, fallback="cudnn", bf16="fa3", policy=self.policy_)
        verdict = fp8_verdict(self.screen, self.policy_, "auto", 0.06)
        measured = {FA3_FP8: {"screen": self.screen, "policy": {**self.policy_.describe(), **verdict}}}
        self.selection = Selection(best="fa3", mode="auto", measured=measured)
        return Outcome.applied("fa3_fp8 (screened)")


def test_health_report_shows_per_layer_and_per_sigma_errors_and_the_policy():
    errors = {1.0: [0.09, 0.02, 0.03], 0.4: [0.05, 0.02, 0.04], 0.1: [0.2, 0.03, 0.05]}
    pairs = [(e, layer, s) for s, row in errors.items() for layer, e in enumerate(row)]
    per_sigma = [{"sigma": s, "layer_error_max": max(row)} for s, row in errors.items()]
    worst = [{"layer": layer, "sigma": s, "error": e} for e, layer, s in sorted(pairs, reverse=True)[:2]]
    per_layer = [max(row[i] for row in errors.values()) for i in range(3)]
    screen = {**screen_with(errors), "per_sigma": per_sigma, "per_layer_max": per_layer, "worst": worst}
    policy = Fp8Policy(frozenset({0}), bf16_below_sigma=0.2)
    fa3 = stack_for(settings(), only=["flash_attention_3"])["flash_attention_3"]
    stack = Stack([ScreenedAttention(settings(), screen, policy), fa3])
    reports = {report.name: report.public() for report in stack.apply(object(), Hardware("cuda", (9, 0)))}
    health = reports["flash_attention_3"]
    assert health["status"] == "applied", health
    assert "layers [0] and steps below sigma 0.2 in bf16 (fa3)" in health["detail"]
    assert health["data"]["fp8_screen"]["per_layer_max"] == [0.2, 0.03, 0.05]
    assert [entry["sigma"] for entry in health["data"]["fp8_screen"]["per_sigma"]] == [1.0, 0.4, 0.1]
    assert health["data"]["fp8_screen"]["layer_errors"] == list(errors.values())
    assert health["data"]["fp8_policy"] == {
        "bf16_layers": [0],
        "bf16_below_sigma": 0.2,
        "use": True,
        "served_error_max": 0.04,  # layer 0 and sigma 0.1 are kept in bf16
        "limit": 0.06,
    }


def test_compiled_blocks_share_one_graph_when_every_layer_serves_fp8():
    """Compiled blocks read a per-layer bool, never the layer index: a compiled block guards on what it reads, and
    the index made each of the 57 blocks its own graph (past dynamo's recompile limit with two shapes: blocks ran
    eager)."""
    from torch._dynamo.testing import CompileCounter

    def graphs_for(policy: Fp8Policy) -> tuple[int, list[bool]]:
        choice = KernelChoice(kernels={FA3_FP8: sdpa, "sdpa": sdpa}, active=FA3_FP8, policy=policy)
        counter = CompileCounter()

        @torch.compile(backend=counter, fullgraph=True)
        def block(attn, x):
            return x * 2 if choice.fp8_for(attn) else x

        modules = [torch.nn.Module() for _ in range(4)]
        for index, module in enumerate(modules):
            module.fp8_layer_index = index
        blocks = [types.SimpleNamespace(attn=module) for module in modules]
        mark_bf16_layers(types.SimpleNamespace(transformer_blocks=blocks), policy)
        served = [bool(block(module, torch.ones(2)).sum() == 4) for module in modules]
        torch._dynamo.reset()
        return counter.frame_count, served

    assert graphs_for(Fp8Policy()) == (1, [True] * 4)
    count, served = graphs_for(Fp8Policy(bf16_layers=frozenset({2})))
    assert served == [True, True, False, True]  # the kept layer still runs bf16
    assert count <= 2  # one graph for the FP8 layers, one for the bf16 ones: never one per index
