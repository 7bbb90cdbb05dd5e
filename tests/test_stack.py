"""The Stack's contract: order checked at build, decisions from settings and hardware alone, per-request accounting,
forward slots, and engines that do not affect each other."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux_kontext.jobs import Job
from flux_kontext.settings import Settings
from flux_kontext.stack import ForwardSlots, Hardware, Optimization, Outcome, Stack, StackOrderError, skip, stack_for

CPU, HOPPER, AMPERE = Hardware("cpu"), Hardware("cuda", (9, 0)), Hardware("cuda", (8, 0))


class Fake(Optimization):
    """An optimization that applies (or reports ``outcome``) and records its per-request switch."""

    def __init__(self, name, flag=None, outcome=None, switchable=False, after=(), requires=(), log=None):
        super().__init__(Settings(model="tiny"))
        self.name, self.flag, self.after, self.requires = name, flag, after, requires
        self.outcome = outcome or Outcome.applied(f"{name} on")
        self.switchable, self.log = switchable, log if log is not None else []

    def apply(self, model):
        return self.outcome

    def switched_off(self):
        return self._off() if self.switchable else None

    @contextlib.contextmanager
    def _off(self):
        self.log.append(f"{self.name} off")
        yield


def test_the_stack_refuses_an_order_its_optimizations_forbid():
    with pytest.raises(StackOrderError, match="b must come after a"):
        Stack([Fake("b", after=("a",)), Fake("a")])
    with pytest.raises(StackOrderError, match="listed twice"):
        Stack([Fake("a"), Fake("a")])
    Stack([Fake("a"), Fake("b", after=("a",))])
    stack_for(Settings(model="tiny"))  # the serving order satisfies every declared constraint


def test_an_optimization_needing_one_that_did_not_apply_is_skipped_with_the_reason():
    stack = Stack([Fake("a", outcome=Outcome.skipped("no FP8 layers")), Fake("b", requires=("a",))])
    reports = stack.apply(None, CPU)
    assert [(r.name, r.status) for r in reports] == [("a", "skipped"), ("b", "skipped")]
    assert reports[1].detail == "needs a (skipped: no FP8 layers)"


def test_one_that_breaks_at_apply_is_failed_and_the_rest_still_apply():
    class Breaks(Fake):
        def apply(self, model):
            raise RuntimeError("kernel exploded")

    reports = Stack([Breaks("a"), Fake("b")]).apply(None, CPU)
    assert [(r.status, r.detail) for r in reports] == [("failed", "RuntimeError: kernel exploded"), ("applied", "b on")]


def test_a_request_reports_what_ran_what_did_not_and_what_could_not_be_turned_off():
    log = []
    stack = Stack(
        [
            Fake("attention"),
            Fake("flash_attention_3", flag="use_flash_attention", switchable=True, log=log),
            Fake("low_precision_gemm", flag="use_mxfp4"),
            Fake("cuda_graphs", flag="use_cuda_graphs", outcome=Outcome("unavailable", "not built")),
        ]
    )
    stack.apply(None, CPU)
    with stack.request(Job(prompt="x", seed=1)) as default:
        pass
    assert default.ran == ["attention", "flash_attention_3", "low_precision_gemm"]
    assert default.not_applied == [{"flag": "use_cuda_graphs", "optimization": "cuda_graphs", "reason": "not built"}]
    assert log == []
    flags = {"use_flash_attention": False, "use_mxfp4": False, "use_cuda_graphs": False}
    with stack.request(Job(prompt="x", seed=1, flags=flags)) as off:
        assert log == ["flash_attention_3 off"]  # switched off around the generation
    assert off.ran == ["attention", "low_precision_gemm"] and off.not_applied == []
    assert [entry["flag"] for entry in off.could_not_turn_off] == ["use_mxfp4"]
    assert stack.warmup_flag_variants() == [{}, {"use_flash_attention": False}]
    assert [r.switchable_per_request for r in stack.reports()] == [False, True, False, False]


def test_reports_are_snapshots_nobody_else_can_change():
    stack = Stack([Fake("a")])
    stack.apply(None, CPU)
    report = stack.reports()[0]
    with pytest.raises(AttributeError):
        report.status = "failed"
    with pytest.raises(TypeError):
        report.data["x"] = 1


# ----- decisions: settings and hardware only, no model ---------------------------------------------------------
DECISIONS = [
    # (optimization, settings, hardware, status, words in the reason)
    ("fuse_qkv", {}, CPU, "apply", ""),
    ("fuse_qkv", {"fuse_qkv": False}, HOPPER, "skipped", "FLUX_FUSE_QKV=false"),
    ("channels_last", {}, HOPPER, "skipped", "measured slower"),
    ("channels_last", {"channels_last": True}, CPU, "skipped", "CPU demo"),
    ("channels_last", {"channels_last": True}, HOPPER, "apply", ""),
    ("flash_attention_3", {}, CPU, "unavailable", "sm_90"),
    ("flash_attention_3", {}, HOPPER, "apply", ""),
    ("low_precision_gemm", {}, CPU, "unavailable", "this is a CPU"),
    ("low_precision_gemm", {}, AMPERE, "unavailable", "sm_80: bf16"),
    ("low_precision_gemm", {"quantize": "none"}, HOPPER, "skipped", "FLUX_QUANTIZE=none"),
    ("low_precision_gemm", {"low_precision_gemm": "fp8"}, HOPPER, "apply", ""),
    ("gelu_sigmoid_form", {}, HOPPER, "apply", ""),
    ("gelu_sigmoid_form", {"compile": False}, HOPPER, "skipped", "compiled code"),
    ("fused_gelu_fp8", {}, CPU, "skipped", "GPU's FP8 path"),
    ("fused_gelu_fp8", {"fused_gelu_fp8": False}, HOPPER, "skipped", "FLUX_FUSED_GELU_FP8=false"),
    ("fused_norm_rope", {"fused_gelu_fp8": False}, HOPPER, "skipped", "needs FLUX_FUSED_GELU_FP8=true"),
    ("fused_norm_rope", {"fused_norm_rope": False}, HOPPER, "skipped", "FLUX_FUSED_NORM_ROPE=false"),
    ("compile", {}, CPU, "skipped", "CPU demo runs eager"),
    ("compile", {"compile": False}, HOPPER, "skipped", "FLUX_COMPILE=false"),
    ("compile", {}, HOPPER, "apply", ""),
    ("cuda_graphs", {}, CPU, "skipped", "need a CUDA device"),
    ("cuda_graphs", {"cuda_graphs": False}, HOPPER, "skipped", "FLUX_CUDA_GRAPHS=false"),
    ("first_block_cache", {"first_block_cache": False}, CPU, "skipped", "FLUX_FIRST_BLOCK_CACHE=false"),
    ("first_block_cache", {}, CPU, "apply", ""),
    ("dpm_solver", {}, CPU, "apply", ""),
    ("text_encoder_graphs", {}, CPU, "skipped", "CUDA graphs need a GPU"),
    ("text_encoder_graphs", {"text_encoder_graphs": False}, HOPPER, "skipped", "FLUX_TEXT_ENCODER_GRAPHS=false"),
    ("text_encoder_graphs", {}, HOPPER, "apply", ""),
    ("lora", {}, CPU, "skipped", "no adapters configured"),
    ("lora", {"loras": ["style=/adapters/style.safetensors"]}, CPU, "apply", ""),
]


@pytest.mark.parametrize(("name", "settings", "hardware", "status", "words"), DECISIONS)
def test_each_optimization_decides_from_settings_and_hardware_alone(name, settings, hardware, status, words):
    [optimization] = stack_for(Settings(model="tiny", **settings), only=[name])
    decision = optimization.decide(hardware)
    assert decision.status == status and words in decision.detail


def test_every_optimization_has_one_name_used_by_its_module_and_report():
    for optimization in stack_for(Settings(model="tiny")):
        module = type(optimization).__module__.removeprefix("flux_kontext.optimizations.")
        assert module == optimization.name, f"{optimization.name} lives in {module}"


def test_the_engine_and_the_generation_name_no_optimization():
    names = stack_for(Settings(model="tiny")).names
    for path in ("flux_kontext/engine.py", "flux_kontext/generation.py"):
        text = (Path(__file__).resolve().parent.parent / path).read_text()
        assert [name for name in names if re.search(rf"\b{name}\b", text)] == [], path


# ----- forward slots ------------------------------------------------------------------------------------------
def test_forward_slots_compose_body_then_compiled_then_graphed_and_clear_back_to_the_class_forward():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    plain = layer(x)
    slots = ForwardSlots()
    trace = []

    def wrapper(tag):
        def make(inner):
            def call(*args):
                trace.append(tag)
                return inner(*args)

            return call

        return make

    slots.set(layer, "graphed", wrapper("graphed"))
    slots.set_body(layer, lambda module, t: torch.nn.functional.linear(t, module.weight, module.bias) * 2)
    slots.set(layer, "compiled", wrapper("compiled"))
    assert slots.filled(layer) == ("body", "compiled", "graphed")
    torch.testing.assert_close(layer(x), plain * 2)
    assert trace == ["graphed", "compiled"]  # outermost first, whatever order they were set in
    slots.clear(layer, "body")  # the slots above now wrap the class's forward
    torch.testing.assert_close(layer(x), plain)
    with pytest.raises(ValueError, match="unknown slot"):
        slots.set(layer, "cached", wrapper("x"))
    slots.clear(layer, "compiled")
    slots.clear(layer, "graphed")
    assert slots.filled(layer) == ()
    torch.testing.assert_close(layer(x), plain)
    assert trace == ["graphed", "compiled", "graphed", "compiled"]  # nothing left wraps it


# ----- two engines in one process -----------------------------------------------------------------------------
def test_two_engines_with_different_settings_do_not_change_each_other():
    from flux_kontext.engine import Engine

    job = dict(prompt="a red door", seed=7, image=Image.new("RGB", (64, 48), (200, 30, 30)), steps=3)
    first = Engine(Settings(model="tiny", warmup=False))
    first.load()
    alone = first.generate(Job(**job))
    second = Engine(Settings(model="tiny", warmup=False, fuse_qkv=False, first_block_cache=False, cache_threshold=0.9))
    second.load()
    other = second.generate(Job(**job, flags={"use_dpm_solver": False}))
    again = first.generate(Job(**job))
    assert [r.public() | {"seconds": 0} for r in first.reports] != [r.public() | {"seconds": 0} for r in second.reports]
    assert again.images[0].tobytes() == alone.images[0].tobytes()
    assert again.optimizations == alone.optimizations and "fuse_qkv" in again.optimizations["ran"]
    assert again.first_block_cache == alone.first_block_cache and again.scheduler == "unipc"
    assert other.first_block_cache is None and other.scheduler == "euler"
    assert "fuse_qkv" not in other.optimizations["ran"]


@torch.inference_mode()
def test_undoing_the_fused_path_of_one_stack_leaves_another_stacks_fused_path_running(monkeypatch):
    from flux_kontext.optimizations.kernels import gelu
    from tests.test_fused_fp8 import _fp8_tiny_transformer, fused_stack

    transformer_a, pipe_a, kwargs, _ = _fp8_tiny_transformer(0)
    transformer_b, pipe_b, _, _ = _fp8_tiny_transformer(0)
    stack_a, stack_b = fused_stack(pipe_a), fused_stack(pipe_b)
    for name in ("fused_norm_rope", "fused_gelu_fp8"):
        stack_b[name].undo()
    calls = []
    real = gelu.reference_gelu_fp8
    monkeypatch.setattr(gelu, "reference_gelu_fp8", lambda *a: calls.append(1) or real(*a))
    transformer_b(**kwargs)
    assert calls == []  # undone: diffusers' forward
    transformer_a(**kwargs)
    blocks = len(transformer_a.transformer_blocks) * 2 + len(transformer_a.single_transformer_blocks)
    assert len(calls) == blocks  # still on the fused path
    assert [r.status for r in stack_a.reports()] == ["applied", "applied"]


def test_a_skip_helper_is_a_decision_not_to_apply():
    assert not skip("why").go and skip("why").detail == "why"


def test_the_feature_name_and_the_seed_era_name_set_the_same_setting(monkeypatch):
    monkeypatch.setenv("FLUX_QUANTIZE", "none")
    assert Settings(model="tiny").low_precision_gemm == "none"
    monkeypatch.delenv("FLUX_QUANTIZE")
    monkeypatch.setenv("FLUX_LOW_PRECISION_GEMM", "fp8")
    assert Settings(model="tiny").quantize == "fp8"
    assert Settings(model="tiny", quantize="none").low_precision_gemm == "none"
    assert Settings(model="tiny", low_precision_gemm="none").quantize == "none"
