"""The optimization stack's logic on CPU: format choice, per-request plans, and our attention processor."""

from __future__ import annotations

import pytest
import torch

from flux_kontext.models import build_random_pipeline
from flux_kontext.optimizations.attention.kernels import KernelChoice, cudnn, sdpa
from flux_kontext.optimizations.attention.processor import install
from flux_kontext.optimizations.low_precision_gemm import choose_format
from flux_kontext.settings import Settings
from flux_kontext.stack import Hardware, Optimization, Outcome, Stack, stack_for

CPU, HOPPER = Hardware("cpu"), Hardware("cuda", (9, 0))


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


def test_the_cudnn_kernel_traces_into_a_graph_the_compile_cache_can_keep():
    """cuDNN attention is called as its aten op, not through ``sdpa_kernel()``: dynamo records that context manager as
    calls to private torch functions, and AOTAutograd's cache bypasses a graph holding them, so each restart rebuilt
    the blocks compiled for ``use_flash_attention: false`` instead of loading them."""
    check_node_safe = pytest.importorskip("torch._functorch._aot_autograd.autograd_cache").check_node_safe
    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    q = torch.randn(1, 16, 2, 64)  # (batch, tokens, heads, head_dim)
    try:
        torch.compile(cudnn, backend=keep, fullgraph=True)(q, q, q)
    except NotImplementedError:  # the CPU has no cuDNN kernel: the traced graph is what this test reads
        pass
    assert len(graphs) == 1
    nodes = list(graphs[0].graph.nodes)
    assert torch.ops.aten._scaled_dot_product_cudnn_attention in [node.target for node in nodes]
    for node in nodes:
        check_node_safe(node)  # raises BypassAOTAutogradCache for what the cache cannot key


@torch.inference_mode()
def test_our_processor_and_fused_qkv_compute_what_diffusers_computes():
    pipe, kwargs, reference = tiny_pipe_with_reference(0)
    transformer = pipe.transformer
    install(transformer, KernelChoice(kernels={"sdpa": sdpa}))
    ours = transformer(**kwargs)[0]
    transformer.fuse_qkv_projections()
    fused = transformer(**kwargs)[0]
    assert reference.abs().max() > 0
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    # A wrong kernel would be caught: a zero kernel changes the output.
    install(transformer, KernelChoice(kernels={"sdpa": lambda q, k, v: q * 0}))
    assert not torch.allclose(transformer(**kwargs)[0], reference, atol=1e-3)


def test_attention_on_cpu_reports_sdpa_and_why_fa3_is_unavailable():
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    stack = stack_for(Settings(model="tiny"), only=["attention", "flash_attention_3"])
    reports = stack.apply(pipe, CPU)
    assert [(r.name, r.status) for r in reports] == [("attention", "applied"), ("flash_attention_3", "unavailable")]
    assert "sm_90" in reports[1].detail and "CPU" in reports[1].detail
    forced = stack_for(Settings(model="tiny", attention="fa3"), only=["attention", "flash_attention_3"])
    broken = forced.apply(pipe, CPU)  # FLUX_DEVICE=auto on a machine without a GPU: fa3 cannot be honoured
    assert broken[0].status == "failed" and "needs a CUDA GPU" in broken[0].detail
    assert broken[1].status == "unavailable"


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
    pipe, kwargs, reference = tiny_pipe_with_reference(1)
    before = sum(p.numel() for p in pipe.transformer.parameters())
    [report] = stack_for(Settings(model="tiny"), only=["fuse_qkv"]).apply(pipe, CPU)
    assert report.status == "applied" and "VAE" in report.detail
    assert sum(p.numel() for p in pipe.transformer.parameters()) == before  # fused copies replace the originals
    assert all(block.attn.to_q is None for block in pipe.transformer.transformer_blocks)
    torch.testing.assert_close(pipe.transformer(**kwargs)[0], reference, rtol=1e-4, atol=1e-4)


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
    from flux_kontext.optimizations.attention.selection import select_kernel

    assert select_kernel(timing) == expected


def test_fp8_screening_keeps_layers_with_outlier_input_channels_in_bf16():
    from flux_kontext.optimizations.low_precision_gemm import select_fp8_layers, simulated_fp8_error

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


class RecordingCompile:
    """Stands in for torch.compile on CPU: the "compiled" function is the eager one, and each call is counted, so a
    test sees which code path a block really ran; ``over_the_limit`` makes it raise as dynamo does past its
    recompile limit with fullgraph."""

    def __init__(self, over_the_limit: bool = False):
        self.calls = 0
        self.over_the_limit = over_the_limit

    def __call__(self, fn, **options):
        def compiled(*args, **kwargs):
            if self.over_the_limit:
                from torch._dynamo.exc import FailOnRecompileLimitHit

                raise FailOnRecompileLimitHit("Hard failure due to fullgraph=True")
            self.calls += 1
            return fn(*args, **kwargs)

        return compiled


def _compiled_tiny(monkeypatch, seed: int, fake: RecordingCompile):
    monkeypatch.setattr(torch, "compile", fake)
    pipe, kwargs, reference = tiny_pipe_with_reference(seed)
    stack = stack_for(Settings(model="tiny"), only=["compile"])
    [report] = stack.apply(pipe, HOPPER)  # "cuda" is what lets it decide to compile; the fake runs on CPU
    return pipe, kwargs, reference, stack, report


@torch.inference_mode()
def test_compile_fills_each_blocks_compiled_slot_and_undo_returns_them_to_eager(monkeypatch):
    fake = RecordingCompile()
    pipe, kwargs, reference, stack, report = _compiled_tiny(monkeypatch, 3, fake)
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert report.status == "applied" and "fullgraph" in report.detail and "VAE Encoder and Decoder" in report.detail
    assert all(stack.slots.filled(block) == ("compiled",) for block in blocks)
    torch.testing.assert_close(pipe.transformer(**kwargs)[0], reference, rtol=0, atol=0)
    assert fake.calls == len(blocks)  # each block ran its compiled forward once
    stack["compile"].undo()
    assert all(stack.slots.filled(block) == () for block in blocks)
    torch.testing.assert_close(pipe.transformer(**kwargs)[0], reference, rtol=0, atol=0)
    assert fake.calls == len(blocks)  # eager again: nothing compiled was called


class BreaksAtFirstUse(Optimization):
    """Stands in for a compile that fails at its first call (an Inductor error on some GPU)."""

    name = "compile"
    undoable = True

    def apply(self, model):
        def fail(module, args, kwargs):
            raise RuntimeError("inductor: something went wrong")

        self._handle = model.pipe.transformer.register_forward_pre_hook(fail, with_kwargs=True)
        return Outcome.applied("compiled")

    def undo(self):
        self._handle.remove()


def test_an_optimization_that_breaks_at_warm_up_is_undone_and_reported():
    from flux_kontext.engine import Engine
    from flux_kontext.jobs import Job

    settings = Settings(model="tiny")
    serving = stack_for(settings)
    stack = Stack([BreaksAtFirstUse(settings) if opt.name == "compile" else opt for opt in serving])
    engine = Engine(settings, stack=stack)
    engine.load()
    assert engine.ready, engine.reason
    report = next(r for r in engine.reports if r.name == "compile")
    assert report.status == "failed"
    assert "broke at warm-up and was undone" in report.detail and "inductor" in report.detail
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
def test_a_block_past_dynamos_recompile_limit_runs_eager_and_the_report_says_so(monkeypatch):
    pipe, kwargs, reference, stack, _ = _compiled_tiny(monkeypatch, 4, RecordingCompile(over_the_limit=True))
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    for _ in range(2):
        torch.testing.assert_close(pipe.transformer(**kwargs)[0], reference, rtol=0, atol=0)
    report = stack["compile"].report()
    assert report.status == "applied"
    assert report.data["blocks_running_eager"] == blocks  # counted once per block: each stays eager
    assert f"{blocks} block(s) now run eager: dynamo's recompile limit was hit" in report.detail
    assert "fullgraph=True" in report.public()["data"]["eager_fallback_reason"]
