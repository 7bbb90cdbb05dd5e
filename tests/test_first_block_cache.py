"""First-block cache on the Kontext pipeline: per-request threshold, exactness at 0, counts, true-CFG state."""

from __future__ import annotations

import pytest

from tests.conftest import image_b64, make_client, wait_ready

REQUEST = {"prompt": "paint it red", "width": 256, "height": 256, "steps": 6, "seed": 21, "scheduler": "euler"}


@pytest.fixture(scope="module")
def uncached():
    with make_client(first_block_cache=False) as client:
        wait_ready(client)
        yield client


def generate(client, **fields):
    response = client.post("/inference", json={**REQUEST, **fields})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("edit", [False, True])
def test_threshold_zero_gives_exactly_the_uncached_result(client, uncached, edit):
    fields = {"image": image_b64(96, 64)} if edit else {}
    reference = generate(uncached, **fields)
    cached = generate(client, cache_threshold=0.0, **fields)
    assert reference["first_block_cache"] is None
    assert cached["first_block_cache"] == {"threshold": 0.0, "computed": 6, "skipped": 0}
    assert cached["images"][0]["image"] == reference["images"][0]["image"]


def test_a_high_threshold_skips_steps_and_says_so(client, uncached):
    cached = generate(client, cache_threshold=1.0)
    counts = cached["first_block_cache"]
    assert counts["threshold"] == 1.0
    assert counts["computed"] + counts["skipped"] == 6
    assert counts["skipped"] >= 1 and counts["computed"] >= 1  # the first step always computes
    assert cached["images"][0]["image"] != generate(uncached)["images"][0]["image"]


def test_default_threshold_is_the_seed_value(client):
    assert generate(client)["first_block_cache"]["threshold"] == 0.12


def test_cache_state_does_not_leak_between_requests(client, uncached):
    generate(client, cache_threshold=1.0)
    again = generate(client, cache_threshold=0.0)
    assert again["images"][0]["image"] == generate(uncached)["images"][0]["image"]


def test_true_cfg_passes_keep_separate_cache_state(client, uncached):
    fields = {"true_cfg_scale": 3.0, "negative_prompt": "blurry", "cache_threshold": 0.0}
    cached = generate(client, **fields)
    assert cached["true_cfg_active"] is True
    assert cached["first_block_cache"] == {"threshold": 0.0, "computed": 12, "skipped": 0}  # cond + uncond per step
    assert cached["images"][0]["image"] == generate(uncached, **fields)["images"][0]["image"]
    skipping = generate(client, **{**fields, "cache_threshold": 1.0})["first_block_cache"]
    assert skipping["computed"] + skipping["skipped"] == 12


def test_health_and_bad_threshold(client):
    reports = {r["name"]: r for r in client.get("/health").json()["optimizations"]}
    assert reports["first_block_cache"]["status"] == "applied"
    assert "0.12" in reports["first_block_cache"]["detail"]
    response = client.post("/inference", json={**REQUEST, "cache_threshold": 2})
    assert response.status_code == 422 and "cache_threshold" in response.json()["error"]["message"]


def test_prompt_and_negative_passes_use_their_own_cache_contexts():
    import torch

    from flux_kontext.models import build_random_pipeline
    from flux_kontext.optimizations.caching import FirstBlockCache
    from tests.test_optimizations import transformer_inputs

    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    cache = FirstBlockCache(pipe.transformer, threshold=0.5)
    cond = transformer_inputs(pipe.transformer, torch.Generator().manual_seed(0))
    negative = torch.randn_like(cond["encoder_hidden_states"])
    uncond = {**cond, "encoder_hidden_states": negative}
    states = cache._head_hook.state_manager._state_cache
    with torch.inference_mode(), cache.request(None, negative):
        pipe.transformer(**cond)
        pipe.transformer(**uncond)
        assert set(states) == {"cond", "uncond"}
        assert not torch.equal(states["cond"].head_block_residual, states["uncond"].head_block_residual)
        assert cache.summary() == {"threshold": 0.5, "computed": 2, "skipped": 0}
    assert states == {}  # reset after the request


def test_threshold_zero_computes_even_an_unchanged_input():
    """diffusers skips when the change is not above the threshold; 0 must still mean never skip."""
    import torch

    from flux_kontext.models import build_random_pipeline
    from flux_kontext.optimizations.caching import FirstBlockCache
    from tests.test_optimizations import transformer_inputs

    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    cache = FirstBlockCache(pipe.transformer, threshold=0.12)
    kwargs = transformer_inputs(pipe.transformer, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with cache.request(0.0, None):
            for _ in range(3):
                pipe.transformer(**kwargs)
            assert cache.summary() == {"threshold": 0.0, "computed": 3, "skipped": 0}
        with cache.request(None, None):
            for _ in range(3):
                pipe.transformer(**kwargs)
            assert cache.summary() == {"threshold": 0.12, "computed": 1, "skipped": 2}
