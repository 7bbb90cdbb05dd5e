"""The optimization stack's logic on CPU: format choice, per-request plans, and our attention processor."""

from __future__ import annotations

import contextlib

import pytest
import torch

from flux_kontext.models import build_random_pipeline
from flux_kontext.optimizations import OptimizationContext, Report, plan_for_request
from flux_kontext.optimizations.attention import KernelChoice, KernelFluxAttnProcessor, _sdpa
from flux_kontext.optimizations.attention import apply as apply_attention
from flux_kontext.optimizations.quantization import choose_format
from flux_kontext.settings import Settings


@pytest.mark.parametrize(
    ("setting", "capability", "expected", "words"),
    [
        ("auto", None, None, "this is a CPU"),
        ("auto", (9, 0), "fp8", "MXFP4 needs FP4 tensor cores (sm_100+), this GPU is sm_90"),
        ("mxfp4", (9, 0), "fp8", "it would only emulate"),
        ("fp8", (9, 0), "fp8", "FP8 e4m3 rowwise (sm_90)"),
        ("auto", (8, 9), "fp8", "sm_89"),
        ("auto", (10, 0), "mxfp4", "FP4 tensor cores (sm_100)"),
        ("fp8", (10, 0), "fp8", "sm_100"),
        ("auto", (8, 0), None, "this GPU is sm_80: bf16"),
        ("none", (9, 0), None, "FLUX_QUANTIZE=none"),
    ],
)
def test_low_precision_format_follows_the_hardware(setting, capability, expected, words):
    fmt, why = choose_format(setting, capability)
    assert fmt == expected
    assert words in why


def test_plan_reports_what_ran_what_did_not_and_what_could_not_be_turned_off():
    switched = []
    reports = [
        Report("attention", "applied", "sdpa"),
        Report(
            "flash_attention_3",
            "applied",
            "fa3",
            flag="use_flash_attention",
            disable=lambda: contextlib.nullcontext(switched.append("fa3 off")),
        ),
        Report("low_precision_gemm", "applied", "fp8", flag="use_mxfp4"),
        Report("cuda_graphs", "unavailable", "not built", flag="use_cuda_graphs"),
    ]
    default = plan_for_request(reports, {})
    assert default.ran == ["attention", "flash_attention_3", "low_precision_gemm"]
    assert default.not_applied == [{"flag": "use_cuda_graphs", "optimization": "cuda_graphs", "reason": "not built"}]
    off = plan_for_request(reports, {"use_flash_attention": False, "use_mxfp4": False, "use_cuda_graphs": False})
    assert off.ran == ["attention", "low_precision_gemm"]
    assert off.not_applied == []
    assert [entry["flag"] for entry in off.forced_on] == ["use_mxfp4"]
    assert len(off.switches) == 1
    with off.switches[0]():
        pass
    assert switched == ["fa3 off"]


def test_kernel_choice_switches_for_one_request_and_restores():
    choice = KernelChoice(kernels={"a": lambda *x: "a", "b": lambda *x: "b"}, active="a", fallback="b")
    with choice.use(choice.fallback):
        assert choice(None, None, None) == "b"
    assert choice(None, None, None) == "a"


def transformer_inputs(transformer, generator):
    config = transformer.config
    return dict(
        hidden_states=torch.randn(1, 64, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.cat([torch.zeros(64, 1), torch.rand(64, 2, generator=generator) * 8], 1),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )


def tiny_pipe_with_reference(seed: int):
    """The tiny CPU pipeline (fp32), transformer inputs drawn with ``seed``, and its output before any change."""
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    kwargs = transformer_inputs(pipe.transformer, torch.Generator().manual_seed(seed))
    return pipe, kwargs, pipe.transformer(**kwargs)[0]


@torch.inference_mode()
def test_our_processor_and_fused_qkv_compute_what_diffusers_computes():
    pipe, kwargs, reference = tiny_pipe_with_reference(0)
    transformer = pipe.transformer
    transformer.set_attn_processor(KernelFluxAttnProcessor(KernelChoice(kernels={"sdpa": _sdpa})))
    ours = transformer(**kwargs)[0]
    transformer.fuse_qkv_projections()
    fused = transformer(**kwargs)[0]
    assert reference.abs().max() > 0
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    # A wrong kernel would be caught: a zero kernel changes the output.
    transformer.set_attn_processor(KernelFluxAttnProcessor(KernelChoice(kernels={"sdpa": lambda q, k, v: q * 0})))
    assert not torch.allclose(transformer(**kwargs)[0], reference, atol=1e-3)


def test_attention_on_cpu_reports_sdpa_and_why_fa3_is_unavailable():
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    reports = apply_attention(pipe, OptimizationContext("cpu", None, Settings(model="tiny")))
    assert [(r.name, r.status) for r in reports] == [("attention", "applied"), ("flash_attention_3", "unavailable")]
    assert "sm_90" in reports[1].detail and "CPU" in reports[1].detail
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        apply_attention(pipe, OptimizationContext("cpu", None, Settings(model="tiny", attention="fa3")))


def test_health_on_cpu_names_every_optimization_with_a_reason(client):
    reports = {r["name"]: r for r in client.get("/health").json()["optimizations"]}
    assert reports["fuse_qkv"]["status"] == "applied"
    assert reports["compile"]["status"] == "skipped"
    assert reports["low_precision_gemm"]["status"] == "unavailable"
    assert "CPU" in reports["low_precision_gemm"]["detail"]
    assert reports["channels_last"]["status"] == "skipped"
    assert {"first_block_cache", "cuda_graphs", "dpm_solver", "attention", "flash_attention_3"} <= set(reports)
    assert all(r["detail"] for r in reports.values())


@torch.inference_mode()
def test_fuse_qkv_step_frees_the_unfused_weights_and_keeps_the_output():
    from types import SimpleNamespace

    from flux_kontext.optimizations.layout import apply_fuse_qkv

    pipe, kwargs, reference = tiny_pipe_with_reference(1)
    before = sum(p.numel() for p in pipe.transformer.parameters())
    report = apply_fuse_qkv(SimpleNamespace(transformer=pipe.transformer, vae=pipe.vae), _cpu_context())
    assert report.status == "applied" and "VAE" in report.detail
    assert sum(p.numel() for p in pipe.transformer.parameters()) == before  # fused copies replace the originals
    assert all(block.attn.to_q is None for block in pipe.transformer.transformer_blocks)
    torch.testing.assert_close(pipe.transformer(**kwargs)[0], reference, rtol=1e-4, atol=1e-4)


def _cpu_context(**settings) -> OptimizationContext:
    return OptimizationContext("cpu", None, Settings(model="tiny", **settings))


@pytest.mark.parametrize(
    ("timing", "expected"),
    [
        ({"cudnn": 1.80, "sdpa": 1.90, "fa3": 1.79}, ("cudnn", "cudnn", True)),  # a 0.6% win is noise
        ({"cudnn": 1.80, "sdpa": 1.90, "fa3": 1.60}, ("fa3", "cudnn", False)),
        ({"cudnn": 1.80, "sdpa": 1.70, "fa3": 1.90}, ("sdpa", "sdpa", False)),
        ({"fa3": 1.0}, ("fa3", "fa3", False)),
    ],
)
def test_fa3_is_kept_only_when_it_is_measurably_faster(timing, expected):
    from flux_kontext.optimizations.attention import select_kernel

    assert select_kernel(timing) == expected


def test_fp8_screening_keeps_layers_with_outlier_input_channels_in_bf16():
    from flux_kontext.optimizations.quantization import select_fp8_layers, simulated_fp8_error

    torch.manual_seed(0)
    normal, outlier = torch.nn.Linear(256, 128, bias=False), torch.nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        # One input channel 1e5x the rest: under a per-row scale the other entries fall below e4m3's normal range.
        outlier.weight[:, 0] *= 1e5
    x = torch.randn(64, 256)
    x[:, 0] = 0.0  # ...while that channel carries nothing: the output lives in the crushed entries
    assert 0.01 < simulated_fp8_error(normal, x) < 0.06
    assert simulated_fp8_error(outlier, x) > 0.1
    references = {"normal": (x, None), "outlier": (x, None)}
    selected, kept = select_fp8_layers(references, {"normal": normal, "outlier": outlier}, max_error=0.06)
    assert selected == {"normal"} and set(kept) == {"outlier"}


@torch.inference_mode()
def test_compile_wraps_each_block_forward_below_the_hooks_and_undo_returns_them_to_eager():
    from flux_kontext.optimizations import compile as compile_step

    pipe, kwargs, reference = tiny_pipe_with_reference(3)
    # torch.compile is lazy, so wrapping works on CPU; a "cuda" context is what lets apply() do it.
    report = compile_step.apply(pipe, OptimizationContext("cuda", (9, 0), Settings(model="tiny")))
    assert report.status == "applied" and "fullgraph" in report.detail
    wrapped = [b.forward for b in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]]
    assert all(isinstance(f, compile_step.CompiledForward) and f.run is not f.eager for f in wrapped)
    assert "VAE Encoder and Decoder" in report.detail
    assert pipe.vae.decoder._compiled_call_impl is not None and pipe.vae.encoder._compiled_call_impl is not None
    report.undo()
    assert all(f.run is f.eager for f in wrapped)
    assert pipe.vae.decoder._compiled_call_impl is None and pipe.vae.encoder._compiled_call_impl is None
    torch.testing.assert_close(pipe.transformer(**kwargs)[0], reference, rtol=0, atol=0)


def test_an_optimization_that_breaks_at_warm_up_is_undone_and_reported(monkeypatch):
    from flux_kontext.engine import Engine

    def breaking_compile(pipe, context):
        """Stands in for a compile that fails at its first call (an Inductor error on some GPU)."""

        def fail(module, args, kwargs):
            raise RuntimeError("inductor: something went wrong")

        handle = pipe.transformer.register_forward_pre_hook(fail, with_kwargs=True)
        return Report("compile", "applied", "compiled", undo=handle.remove)

    monkeypatch.setattr("flux_kontext.optimizations.compile.apply", breaking_compile)
    engine = Engine(Settings(model="tiny"))
    engine.load()
    assert engine.ready, engine.reason
    report = next(r for r in engine.reports if r.name == "compile")
    assert report.status == "failed"
    assert "broke at warm-up and was undone" in report.detail and "inductor" in report.detail
    from flux_kontext.jobs import Job

    assert engine.generate(Job(prompt="x", seed=1, width=256, height=256, steps=1)).images[0].size == (256, 256)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"device": "cpu", "attention": "fa3"}, "FLUX_ATTENTION=fa3 is a GPU kernel"),
        ({"device": "cpu", "attention": "cudnn"}, "use auto or sdpa"),
        ({"device": "cpu", "quantize": "fp8"}, "FLUX_QUANTIZE=fp8 needs a GPU"),
        ({"compile": False, "compile_multi_kernel": True}, "needs FLUX_COMPILE=true"),
    ],
)
def test_settings_refuse_combinations_that_cannot_work(settings, words):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=words):
        Settings(model="tiny", **settings)
    Settings(model="tiny", device="cpu", attention="auto", quantize="auto")  # auto values adapt instead


@torch.inference_mode()
def test_a_block_past_dynamos_recompile_limit_runs_eager_and_the_report_says_so():
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from flux_kontext.optimizations import compile as compile_step

    pipe, kwargs, reference = tiny_pipe_with_reference(4)
    report = compile_step.apply(pipe, OptimizationContext("cuda", (9, 0), Settings(model="tiny")))
    block_forward = pipe.transformer.single_transformer_blocks[0].forward

    def over_the_limit(*args, **kwargs):
        raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
        if block.forward is not block_forward:
            block.forward.undo()  # the others run eager here (CPU); only this one is "compiled"
    block_forward.run = over_the_limit
    for _ in range(2):
        torch.testing.assert_close(pipe.transformer(**kwargs)[0], reference, rtol=0, atol=0)
    assert report.status == "applied"
    assert report.data["blocks_running_eager"] == 1  # counted once: the block stays eager
    assert "1 block(s) now run eager: dynamo's recompile limit was hit" in report.detail
    assert "fullgraph=True" in report.public()["data"]["eager_fallback_reason"]
