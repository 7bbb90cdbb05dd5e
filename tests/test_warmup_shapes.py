"""Warm-up shapes: which shapes warm-up plans for the settings, what /health says is ready, and that compile for
dynamic shapes serves a size warm-up never ran without compiling again (dynamo for real, with its eager backend on
the CPU: the graphs it traces and the recompiles it counts are the ones Inductor would get on the GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel
from fastapi.testclient import TestClient

from flux_kontext.engine import Engine
from flux_kontext.jobs import Job
from flux_kontext.models import TINY_TRANSFORMER
from flux_kontext.optimizations.attention.fp8_policy import Fp8Policy, mark_bf16_layers, number_attention_layers
from flux_kontext.optimizations.attention.kernels import FA3_FP8, KernelChoice, sdpa
from flux_kontext.optimizations.attention.processor import install
from flux_kontext.optimizations.compile import Compile
from flux_kontext.resolution import PREFERRED_KONTEXT_RESOLUTIONS
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from flux_kontext.stack import APPLY, Hardware, Stack
from flux_kontext.warmup_shapes import Shape, ShapeReadiness, warmup_plan
from tests.conftest import wait_ready
from tests.test_optimizations import transformer_inputs

REAL_COMPILE = torch.compile


def planned(warmup_shapes: str, strategy: str) -> list[str]:
    return [p.shape.key for p in warmup_plan(warmup_shapes, strategy)]


def test_dynamic_compile_warms_every_preferred_resolution_both_modes_batches_true_cfg_and_an_explicit_size():
    keys = planned("all", "dynamic")
    for width, height in PREFERRED_KONTEXT_RESOLUTIONS:
        assert f"edit {width}x{height}" in keys and f"text_to_image {width}x{height}" in keys
    for n in (2, 3, 4):
        assert f"edit 1024x1024 x{n}" in keys and f"text_to_image 1024x1024 x{n}" in keys
    assert {"edit 1024x1024 true_cfg", "text_to_image 1024x1024 true_cfg"} <= set(keys)
    assert {"text_to_image 1280x720", "edit 1280x720 context 1024x1024"} <= set(keys)
    assert len(keys) == len(set(keys)) == 17 * 2 + 3 * 2 + 2 + 2
    # The 1024² shapes first and with two steps (their CUDA graphs are captured at warm-up); the rest one step.
    plan = warmup_plan("all", "dynamic")
    assert [(p.shape.key, p.steps, p.all_variants) for p in plan[:2]] == [
        ("edit 1024x1024", 2, True),
        ("text_to_image 1024x1024", 2, True),
    ]
    assert {p.steps for p in plan[2:]} == {1} and not any(p.all_variants for p in plan[2:])


def test_by_default_warm_up_runs_what_compiles_the_1024_shapes_with_every_variant_and_a_batch_of_two():
    assert Settings(model="tiny").warmup_shapes == "compiled"
    plan = warmup_plan("compiled", "dynamic")
    assert [(p.shape.key, p.steps, p.all_variants) for p in plan] == [
        ("edit 1024x1024", 2, True),
        ("text_to_image 1024x1024", 2, True),
        ("edit 1024x1024 x2", 1, False),
        ("text_to_image 1024x1024 x2", 1, False),
    ]
    assert planned("compiled", "static") == planned("minimal", "dynamic")


def test_static_compile_or_minimal_warms_only_the_1024_shapes_and_without_compile_one_small_edit():
    assert planned("all", "static") == planned("minimal", "dynamic") == ["edit 1024x1024", "text_to_image 1024x1024"]
    assert planned("all", "eager") == ["edit 1184x880"]  # the 64x48 check image, snapped


def test_the_warm_up_jobs_have_the_shape_they_stand_for():
    job = Shape("edit", 1280, 720, num_images=3, true_cfg=True, context=(1024, 1024)).job(seed=5, steps=1)
    assert job.image.size == (1024, 1024) and (job.width, job.height) == (1280, 720)
    assert job.num_images == 3 and job.true_cfg_scale > 1 and job.negative_prompt and job.steps == 1
    assert Shape("edit", 1280, 720, context=(1024, 1024)).tokens == 80 * 45 + 64 * 64
    assert Shape("text_to_image", 672, 1568).job(seed=0, steps=1).image is None


@pytest.mark.parametrize(
    ("strategy", "unwarmed"), [("dynamic", "dynamic"), ("static", "will compile"), ("eager", "eager")]
)
def test_readiness_of_shapes_warm_up_ran_and_did_not_run(strategy, unwarmed):
    readiness = ShapeReadiness()
    readiness.strategy = strategy
    readiness.warmed["edit 1024x1024"] = {"graphs_compiled": 2, "seconds": 1.0}
    report = readiness.report(captured_shapes=[[[1, 8192, 64], [1, 512, 4096]]])
    warmed = "eager" if strategy == "eager" else "compiled"
    assert report["preferred"]["edit"]["1024x1024"] == {"code": warmed, "cuda_graphs": "captured"}
    assert report["preferred"]["text_to_image"]["1024x1024"] == {"code": unwarmed, "cuda_graphs": "not captured"}
    assert report["num_images_1024"]["edit"]["4"]["code"] == unwarmed
    assert report["explicit_sizes"] == unwarmed
    assert "cuda_graphs" not in readiness.report(None)["preferred"]["edit"]["1024x1024"]  # graphs not applied


def test_health_on_the_cpu_says_every_shape_runs_eager_and_a_non_warmed_explicit_size_works(client):
    shapes = client.get("/health").json()["shapes"]
    assert shapes["strategy"] == "eager" and shapes["explicit_sizes"] == "eager"
    assert list(shapes["warmed"]) == ["edit 1184x880"]
    assert len(shapes["preferred"]["edit"]) == len(shapes["preferred"]["text_to_image"]) == 17
    response = client.post("/inference", json={"prompt": "a boat", "width": 272, "height": 400, "steps": 1})
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    assert (image["width"], image["height"]) == (272, 400)
    assert client.get("/health").json()["shapes"]["compiled_after_ready"] == {"requests": 0, "graphs_by_shape": {}}


# ----- compile for dynamic shapes, traced by dynamo for real (its eager backend: no C++ compiler needed) -----------
class CompileOnCpu(Compile):
    """compile applied on the CPU (it is for the GPU path otherwise); the backend is dynamo's eager one."""

    def decide(self, hardware):
        return APPLY


@pytest.fixture
def dynamo_eager(monkeypatch):
    def eager_backend(fn, **kwargs):
        kwargs.pop("options", None)
        return REAL_COMPILE(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_backend)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_app(**settings) -> TestClient:
    settings = Settings(model="tiny", warmup_shapes="minimal", first_block_cache=False, **settings)
    return TestClient(create_app(settings, lambda s: Engine(s, Stack([CompileOnCpu(s)]))))


def new_size_request(client) -> dict:
    """A size warm-up never ran (not square: a square warm-up must not tie height to width; on the CPU its latents
    stay above the 20480 elements where the CPU's convolution backend choice changes, a CPU-only guard)."""
    response = client.post("/inference", json={"prompt": "a boat", "width": 528, "height": 400, "steps": 1})
    assert response.status_code == 200, response.text
    return client.get("/health").json()


def test_dynamic_compile_serves_a_size_warm_up_never_ran_without_compiling(dynamo_eager):
    with compiled_app() as client:
        health = wait_ready(client, timeout_s=300)
        compile_report = next(r for r in health["optimizations"] if r["name"] == "compile")
        assert compile_report["status"] == "applied" and compile_report["data"]["dynamic_shapes"] is True
        assert "hidden_states" in compile_report["data"]["dynamic_dims"]["transformer_blocks"]
        # The VAE: compiled for one 1024² image (its encoder's and decoder's input shapes), eager at other sizes.
        assert compile_report["data"]["vae"] == "hot"
        vae = health["shapes"]["vae"]
        assert vae["other_shapes"] == "eager" and vae["compiled_for_inputs"]["Encoder"] == [1, 3, 1024, 1024]
        assert vae["compiled_for_inputs"]["Decoder"][0] == 1 and vae["compiled_for_inputs"]["Decoder"][2:] == [128, 128]
        shapes = health["shapes"]
        assert shapes["strategy"] == "dynamic" and shapes["explicit_sizes"] == "dynamic"
        assert shapes["preferred"]["edit"]["1024x1024"]["code"] == "compiled"
        assert shapes["preferred"]["edit"]["672x1568"]["code"] == "dynamic"
        assert shapes["warmed"]["edit 1024x1024"]["graphs_compiled"] > 0  # the first call compiled
        after = new_size_request(client)["shapes"]["compiled_after_ready"]
        assert after == {"requests": 0, "graphs_by_shape": {}}


def test_static_compile_says_a_new_size_will_compile_and_counts_the_request_that_did(dynamo_eager):
    with compiled_app(compile_dynamic=False) as client:
        shapes = wait_ready(client, timeout_s=300)["shapes"]
        assert shapes["strategy"] == "static" and shapes["explicit_sizes"] == "will compile"
        assert shapes["preferred"]["text_to_image"]["672x1568"]["code"] == "will compile"
        health = new_size_request(client)
        after = health["shapes"]["compiled_after_ready"]
        assert after["requests"] == 1 and after["graphs_by_shape"]["text_to_image 528x400"] > 0
        compile_report = next(r for r in health["optimizations"] if r["name"] == "compile")
        assert compile_report["data"]["dynamic_shapes"] is False and compile_report["data"]["graphs_compiled"] > 0


@torch.inference_mode()
def test_the_blocks_compile_once_per_block_kind_with_fa3_in_fp8_choosing_per_layer(dynamo_eager):
    """Each block's attention layer has its own index (FP8 attention's policy is per layer); compiled code guards on
    what it reads, so reading the index would compile each of the blocks apart."""
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 3}).eval()
    settings = Settings(model="tiny")
    choice = KernelChoice(kernels={"sdpa": sdpa, FA3_FP8: sdpa}, active=FA3_FP8, fallback="sdpa")
    install(transformer, choice)
    mark_bf16_layers(transformer, Fp8Policy.from_settings(settings, number_attention_layers(transformer)))
    stack = Stack([CompileOnCpu(settings)])
    stack.apply(SimpleNamespace(transformer=transformer, vae=None), Hardware("cuda", (9, 0)))
    with stack.request(Job(prompt="a cat", seed=0)) as run:
        transformer(**transformer_inputs(transformer, torch.Generator().manual_seed(0)))
    assert run.counters["compile"] == {"graphs_compiled": 2}  # one FluxTransformerBlock, one single block graph


def repeated(inputs: dict, batch: int) -> dict:
    """The transformer's inputs with each image's rows repeated ``batch`` times (ids and flags as they are)."""
    names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
    return {**inputs, **{name: inputs[name].expand(batch, *inputs[name].shape[1:]).contiguous() for name in names}}


@torch.inference_mode()
def test_a_batch_of_two_compiles_one_graph_per_block_kind_and_larger_batches_none(dynamo_eager):
    """The first single block receives the double blocks' two outputs, the later ones two slices of the previous
    block's joint output: at two images their batch strides differ, and without the joint layout the single blocks
    compiled twice for it. The layout changes no value."""
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 3}).eval()
    stack = Stack([CompileOnCpu(Settings(model="tiny"))])
    stack.apply(SimpleNamespace(transformer=transformer, vae=None), Hardware("cuda", (9, 0)))
    inputs = transformer_inputs(transformer, torch.Generator().manual_seed(0))
    compiled, outputs = [], []
    for batch in (1, 2, 3):
        with stack.request(Job(prompt="a cat", seed=0)) as run:
            outputs.append(transformer(**repeated(inputs, batch))[0])
        compiled.append(run.counters.get("compile", {}).get("graphs_compiled", 0))
    assert compiled == [2, 2, 0]  # one image: a graph per block kind; two: one more per kind; three: none
    for output in outputs[1:]:
        for image in output:
            torch.testing.assert_close(image, outputs[0][0])


def test_warm_up_runs_a_switched_off_variant_one_step_and_the_default_two(dynamo_eager):
    """A variant (a per-request switch off) needs its compiled code, which one step reloads or compiles; its CUDA
    graphs are captured by its first request. The default 1024² generations keep their two steps (graphs captured)."""
    from flux_kontext.optimizations.dpm_solver import DpmSolver
    from flux_kontext.warmup_record import generation_key

    settings = Settings(model="tiny", warmup_shapes="minimal", first_block_cache=False)
    app = create_app(settings, lambda s: Engine(s, Stack([CompileOnCpu(s), DpmSolver(s)])))
    with TestClient(app) as client:
        ran = wait_ready(client, timeout_s=300)["shapes"]["warmup"]["ran"]
    off = {"flags": {"use_dpm_solver": False}}
    assert generation_key("edit 1024x1024", 2, {"flags": {}}) in ran
    assert generation_key("edit 1024x1024", 1, off) in ran
    assert generation_key("edit 1024x1024", 2, off) not in ran


def batch_request(client, num_images: int) -> dict:
    body = {"prompt": "a boat", "width": 256, "height": 256, "steps": 1, "num_images": num_images}
    response = client.post("/inference", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == num_images
    return client.get("/health").json()


@pytest.mark.parametrize(("batch", "compiles"), [("unbacked", False), ("specialized", True)])
def test_an_unbacked_batch_serves_every_num_images_from_the_graphs_one_image_compiled(dynamo_eager, batch, compiles):
    with compiled_app(compile_batch=batch) as client:
        health = wait_ready(client, timeout_s=300)
        compile_report = next(r for r in health["optimizations"] if r["name"] == "compile")
        assert compile_report["data"]["batch"] == batch
        assert "blocks_batch_specialized" not in compile_report["data"]
        after = batch_request(client, 2)["shapes"]["compiled_after_ready"]
        # Warm-up ran one image only (FLUX_WARMUP_SHAPES=minimal): a specialized batch compiles again for two.
        assert (after["requests"] > 0) is compiles
        assert batch_request(client, 3)["shapes"]["compiled_after_ready"] == after  # 3 runs what 2 compiled


def test_a_block_that_guards_on_its_batch_is_compiled_with_the_batch_specialized(dynamo_eager):
    from flux_kontext.optimizations.compile import CompiledForward

    def block(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None):
        if hidden_states.shape[0] == 1:  # a guard on the batch: no unbacked size can answer it
            return hidden_states * 2
        return hidden_states + temb[:, None]

    reasons = []
    compiled = CompiledForward(block, {}, print, dynamic=True, unbacked_batch=True, on_batch_fallback=reasons.append)
    one = torch.ones(1, 4, 8)
    text, temb = torch.zeros(1, 3, 8), torch.ones(1, 8)
    assert torch.equal(compiled(hidden_states=one, encoder_hidden_states=text, temb=temb), one * 2)
    assert len(reasons) == 1 and "data-dependent" in reasons[0] and compiled.unbacked_batch is False
    two = torch.ones(2, 4, 8)
    out = compiled(hidden_states=two, encoder_hidden_states=text.expand(2, 3, 8), temb=temb.expand(2, 8))
    assert torch.equal(out, two + 1) and len(reasons) == 1
