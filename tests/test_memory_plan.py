"""The memory plan: tier selection as a table (budget and capability -> tier), the request limit it sets through the
HTTP API, /health's report of it, the prompt-embedding cache, and block-by-block loading of every source."""

from __future__ import annotations

import base64

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import T5Config

from flux_kontext.loading import meta_skeleton, model_sizes
from flux_kontext.memory_plan import (
    GIB,
    LARGEST_REQUEST,
    MAX_NUM_IMAGES,
    PlanDoesNotFit,
    choose_plan,
)
from flux_kontext.models import FULL_T5, FULL_TRANSFORMER, build_random_pipeline, load_model
from flux_kontext.resolution import RequestShape
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from flux_kontext.text_encoding import PromptEncoder
from tests.conftest import decode_b64_image, image_b64, wait_ready

LARGEST = RequestShape("edit", *LARGEST_REQUEST, num_images=MAX_NUM_IMAGES)
# FLUX_GPU_MEMORY_GIB for the tiny model on the CPU: weights and one image fit, not MAX_NUM_IMAGES at 1568x672.
TINY_TIGHT_GIB = 2.54


@pytest.fixture(scope="module")
def full_sizes():
    """The full-size model's bytes, from its architecture on the meta device (no weights)."""
    skeleton = meta_skeleton(FULL_TRANSFORMER, T5Config(**FULL_T5), torch.bfloat16)
    small = {"text_encoder": 246_144_000, "vae": 167_666_902, "vae_channels": 128}  # CLIP-L and the FLUX VAE, bf16
    return model_sizes(skeleton, torch.bfloat16, small, 512)


@pytest.mark.parametrize(
    "gib, capability, tier, t5, fp8",
    [
        (139, (9, 0), 1, "gpu", True),  # H200: everything resident
        (80, (8, 0), 1, "gpu", False),  # A100-80GB: no FP8, bf16 resident
        (48, (8, 9), 1, "gpu", True),  # L40S / 6000 Ada
        (24, (8, 9), 2, "on_demand", True),  # 4090: FP8 transformer, T5 copied in per new prompt
        (24, (9, 0), 2, "on_demand", True),
        (16, (9, 0), 2, "streamed", True),  # T5 cannot visit whole: its layers visit one at a time
        (32, (8, 0), 2, "streamed", False),  # bf16 transformer resident, text encoder off the GPU
        (24, (8, 6), 3, "streamed", False),  # 3090 / A10: no FP8, the bf16 transformer does not fit: streamed
    ],
)
def test_tier_follows_memory_and_capability(full_sizes, gib, capability, tier, t5, fp8):
    plan = choose_plan(gib * GIB, capability, full_sizes)
    assert (plan.tier, plan.placements["text_encoder_2"], plan.transformer_fp8) == (tier, t5, fp8)
    assert sum(plan.gpu_bytes.values()) + plan.activations.reserve <= gib * GIB
    assert plan.max_num_images(LARGEST) >= 1


def test_fp8_halves_the_transformer_and_is_used_only_where_it_runs(full_sizes):
    assert 0.45 < full_sizes.transformer_fp8 / full_sizes.transformer_bf16 < 0.55
    with_fp8 = choose_plan(24 * GIB, (9, 0), full_sizes)
    without = choose_plan(24 * GIB, (9, 0), full_sizes, fp8_wanted=False)  # FLUX_LOW_PRECISION_GEMM=none
    assert with_fp8.gpu_bytes["transformer"] == full_sizes.transformer_fp8
    assert without.tier == 3 and not without.transformer_fp8


def test_cuda_graphs_only_where_their_memory_fits(full_sizes):
    assert choose_plan(139 * GIB, (9, 0), full_sizes).cuda_graphs
    assert not choose_plan(32 * GIB, (9, 0), full_sizes).cuda_graphs
    assert not choose_plan(139 * GIB, (9, 0), full_sizes, cuda_graphs_wanted=False).cuda_graphs


def test_a_tight_budget_limits_num_images_and_says_so(full_sizes):
    plan = choose_plan(16 * GIB, (9, 0), full_sizes)
    most = plan.max_num_images(LARGEST)
    assert 1 <= most < MAX_NUM_IMAGES
    assert plan.refusal(RequestShape("edit", *LARGEST_REQUEST, num_images=most)) is None
    message = plan.refusal(RequestShape("edit", *LARGEST_REQUEST, num_images=most + 1))
    assert f"at most {most} image" in message and "16.0 GiB" in message and "1568x672" in message
    # Fewer tokens, more images: a 1024² text-to-image holds at least as many as the widest edit.
    assert plan.max_num_images(RequestShape("text_to_image", 1024, 1024, num_images=4)) >= most


def test_more_memory_never_means_a_slower_tier_or_fewer_images(full_sizes):
    plans = [choose_plan(gib * GIB, (9, 0), full_sizes) for gib in range(10, 140, 2)]
    tiers = [plan.tier for plan in plans]
    assert tiers == sorted(tiers, reverse=True) and tiers[0] == 3 and tiers[-1] == 1
    # Within the tiers that keep the transformer resident (streaming it is the last resort, whatever it holds).
    held = [plan.max_num_images(LARGEST) for plan in plans if plan.tier < 3]
    assert held == sorted(held)


@pytest.mark.parametrize("gib", [24, 48, 139])
def test_the_headroom_cuda_graphs_keep_free_holds_the_largest_admitted_request(full_sizes, gib):
    plan = choose_plan(gib * GIB, (9, 0), full_sizes)
    largest = RequestShape("edit", *LARGEST_REQUEST)
    most = plan.max_num_images(largest)
    headroom = plan.request_headroom()
    assert headroom >= most * plan.per_image(largest) and headroom >= plan.vae_bytes(largest)
    assert sum(plan.gpu_bytes.values()) + plan.reserve + headroom <= plan.budget  # it fits beside the weights
    limits = plan.stack_limits(on_gpu=True)
    assert limits == {"memory_budget": gib * GIB, "request_headroom": headroom}
    assert plan.stack_limits(on_gpu=False) == {}  # FLUX_GPU_MEMORY_GIB on a CPU: the plan only, no graphs


def test_too_little_memory_refuses_with_what_it_needs(full_sizes):
    with pytest.raises(PlanDoesNotFit, match=r"4\.0 GiB is too small.*needs about \d+\.\d GiB"):
        choose_plan(4 * GIB, (9, 0), full_sizes)


# ----- through the service (tiny model on the CPU; FLUX_GPU_MEMORY_GIB simulates the budget) --------------------
def test_health_reports_the_plan_and_the_load(monkeypatch):
    with TestClient(create_app(Settings(model="tiny", warmup=False))) as client:
        on_cpu = wait_ready(client)["memory_plan"]
    assert on_cpu["tier"] == 0 and on_cpu["budget_gib"] is None
    assert on_cpu["load"]["host_rss_peak_gib"] > 0
    with TestClient(create_app(Settings(model="tiny", warmup=False, gpu_memory_gib=TINY_TIGHT_GIB))) as client:
        health = wait_ready(client)
    plan = health["memory_plan"]
    assert plan["budget_gib"] == TINY_TIGHT_GIB and "FLUX_GPU_MEMORY_GIB" in plan["budget_source"]
    assert set(plan["placements"]) == {"transformer", "text_encoder_2", "text_encoder", "vae"}
    assert all(isinstance(size, int) and size > 0 for size in plan["gpu_bytes"].values())
    fuse = next(r for r in health["optimizations"] if r["name"] == "fuse_qkv")
    assert "at load" in fuse["detail"]  # fused block by block while loading, reported by the optimization


def test_a_request_above_the_plans_limit_gets_a_422_naming_it():
    with TestClient(create_app(Settings(model="tiny", warmup=False, gpu_memory_gib=TINY_TIGHT_GIB))) as client:
        most = wait_ready(client)["memory_plan"]["max_num_images_largest_edit"]
        assert 1 <= most < MAX_NUM_IMAGES
        wide = {"prompt": "wider", "image": image_b64(*LARGEST_REQUEST), "steps": 1}
        refused = client.post("/inference", json={**wide, "num_images": most + 1})
        job = client.post("/v1/jobs", json={**wide, "num_images": most + 1})
        fields = {"prompt": "wider", "n": str(most + 1), "steps": "1"}
        png = base64.b64decode(wide["image"])
        openai = client.post("/v1/images/edits", data=fields, files={"image": ("wide.png", png, "image/png")})
        small = client.post(
            "/inference", json={"prompt": "small", "width": 256, "height": 256, "steps": 1, "num_images": 4}
        )
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["type"] == "exceeds_memory_plan"
    assert f"num_images={most + 1}" in error["message"] and f"at most {most} image" in error["message"]
    assert job.status_code == 422 and job.json()["error"]["type"] == "exceeds_memory_plan"  # before a job exists
    # The OpenAI edit names its own parameter: n, not num_images.
    assert openai.status_code == 400, openai.text
    error = openai.json()["error"]
    assert (error["code"], error["param"]) == ("exceeds_memory_plan", "n") and f"n={most + 1} at" in error["message"]
    assert small.status_code == 200 and len(small.json()["images"]) == 4  # the limit depends on the size


def test_the_largest_edit_at_num_images_1_to_4_is_served_or_refused_naming_the_limit():
    """What the independent check sends at a low cap, on the tiny model: the widest preferred resolution's edit
    (the most tokens accepted) with num_images 1-4: each a 200 with that many images, or a 422 naming the limit;
    refusals only above the limit, never a 500. (Every preferred resolution on the GPU: bench/memory_tiers.py.)"""
    width, height = LARGEST_REQUEST
    body = {"prompt": "walk", "image": image_b64(width, height), "steps": 1, "output_format": "jpeg"}
    statuses = []
    with TestClient(create_app(Settings(model="tiny", warmup=False, gpu_memory_gib=TINY_TIGHT_GIB))) as client:
        most = wait_ready(client)["memory_plan"]["max_num_images_largest_edit"]
        for n in range(1, MAX_NUM_IMAGES + 1):
            answer = client.post("/inference", json={**body, "num_images": n})
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                images = answer.json()["images"]
                assert len(images) == n and (images[0]["width"], images[0]["height"]) == (width, height)
            else:
                error = answer.json()["error"]
                assert answer.status_code == 422 and error["type"] == "exceeds_memory_plan", answer.text
                assert f"num_images={n} at {width}x{height}" in error["message"]
    assert statuses == [200] * most + [422] * (MAX_NUM_IMAGES - most) and most < MAX_NUM_IMAGES


def test_a_budget_too_small_for_the_model_fails_the_start_with_what_it_needs():
    with TestClient(create_app(Settings(model="tiny", warmup=False, gpu_memory_gib=1.0))) as client:
        health = client.get("/health")
        while health.json()["state"] in ("starting", "loading"):
            health = client.get("/health")
    assert health.status_code == 503 and health.json()["state"] == "failed"
    assert "1.0 GiB is too small" in health.json()["reason"] and "needs about" in health.json()["reason"]


def _two_identical_and_one_other(client) -> tuple[list, dict]:
    body = {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 1, "seed": 5}
    images = [client.post("/inference", json=body).json()["images"][0]["image"] for _ in range(2)]
    images.append(client.post("/inference", json={**body, "prompt": "another"}).json()["images"][0]["image"])
    return images, client.get("/health").json()["memory_plan"]["prompt_cache"]


def test_the_prompt_cache_serves_repeats_with_the_same_output():
    with TestClient(create_app(Settings(model="tiny", warmup=False, prompt_cache="on"))) as client:
        wait_ready(client)
        cached, counters = _two_identical_and_one_other(client)
    with TestClient(create_app(Settings(model="tiny", warmup=False, prompt_cache="off"))) as client:
        wait_ready(client)
        uncached, no_cache = _two_identical_and_one_other(client)
    assert counters["hits"] == 1 and counters["misses"] == 2 and counters["entries"] == 2
    assert no_cache is None
    assert [decode_b64_image(i).tobytes() for i in cached] == [decode_b64_image(i).tobytes() for i in uncached]
    assert cached[0] != cached[2]  # a different prompt is not served from the cache


def test_the_prompt_cache_is_on_by_itself_when_t5_leaves_the_gpu():
    with TestClient(create_app(Settings(model="tiny", warmup=False, gpu_memory_gib=2.55))) as client:
        plan = wait_ready(client)["memory_plan"]
    assert plan["placements"]["text_encoder_2"] in ("on_demand", "cpu")
    assert plan["prompt_cache"] is not None and plan["prompt_cache"]["capacity"] == 64


@pytest.mark.parametrize("placement", ["on_demand", "streamed"])
def test_t5_off_the_device_encodes_the_same_embeddings(placement):
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    resident = PromptEncoder(pipe, torch.device("cpu"), 64, "gpu", 0).encode("a prompt", 2)
    visiting = PromptEncoder(pipe, torch.device("cpu"), 64, placement, 0)
    for _ in range(2):  # the second call finds the weights back where they live and no hook left behind
        got = visiting.encode("a prompt", 2)
        assert all(torch.equal(a, b) for a, b in zip(got, resident, strict=True))
    assert got[0].shape[0] == 2


# ----- loading: one path for every source ----------------------------------------------------------------------
def test_a_saved_folder_loads_block_by_block_to_the_same_pipeline(tmp_path):
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    pipe.save_pretrained(tmp_path / "kontext")
    loaded = load_model(Settings(model=str(tmp_path / "kontext")), torch.device("cpu"), torch.float32).pipe
    args = dict(prompt="a cat", num_inference_steps=1, width=64, height=64, output_type="np", max_sequence_length=64)
    want = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    got = loaded(**args, generator=torch.Generator().manual_seed(0)).images
    assert abs(want - got).max() < 1e-5
    t5 = loaded.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # the tied embedding loaded once


def test_random_weights_are_the_same_on_every_build():
    first, second = (build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32) for _ in "ab")
    for a, b in zip(first.transformer.parameters(), second.transformer.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.is_meta for p in first.text_encoder_2.parameters())
