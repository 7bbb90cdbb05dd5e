"""First-block cache on the Kontext pipeline: per-request threshold, exactness at 0, counts, true-CFG state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flux_kontext.jobs import Job
from flux_kontext.optimizations.first_block_cache import FirstBlockCache, FirstBlockCacheControl
from flux_kontext.settings import Settings
from flux_kontext.stack import Hardware, RequestRun, Stack
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


def tiny_transformer_and_inputs():
    from flux_kontext.models import build_random_pipeline
    from tests.test_optimizations import transformer_inputs

    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    return pipe.transformer, transformer_inputs(pipe.transformer, torch.Generator().manual_seed(0))


@torch.inference_mode()
def test_prompt_and_negative_passes_use_their_own_cache_contexts():
    """The negative pass of true CFG is told apart by the request's negative embeddings, and each pass is compared
    with its own previous step: alternating cond/uncond, each repeated input is skipped (its own residual has not
    changed) and gives its own pass's output; in one shared state, every call would differ from the one before."""
    transformer, cond = tiny_transformer_and_inputs()
    negative = torch.randn_like(cond["encoder_hidden_states"])
    uncond = {**cond, "encoder_hidden_states": negative}
    cache = FirstBlockCacheControl(transformer, threshold=0.01)

    def alternate(run, threshold=None):
        with cache.request(threshold, run):
            outputs = [transformer(**kwargs)[0].clone() for kwargs in (cond, uncond, cond, uncond)]
            return outputs, cache.summary()

    reference, counts = alternate(RequestRun(negative_prompt_embeds=negative), threshold=0.0)  # never skips
    assert counts == {"threshold": 0.0, "computed": 4, "skipped": 0}
    torch.testing.assert_close(reference[2], reference[0], rtol=0, atol=0)
    assert not torch.allclose(reference[1], reference[0])

    outputs, counts = alternate(RequestRun(negative_prompt_embeds=negative))
    assert counts == {"threshold": 0.01, "computed": 2, "skipped": 2}
    for have, want in zip(outputs, reference, strict=True):
        torch.testing.assert_close(have, want)  # a skipped pass reuses its own pass's residual, not the other's
    # Without the negative embeddings in the run both passes are "cond": one state, each call differs from the last.
    assert alternate(RequestRun())[1] == {"threshold": 0.01, "computed": 4, "skipped": 0}
    # The state is reset after a request: a new one computes its first uncond and cond calls again.
    outputs, counts = alternate(RequestRun(negative_prompt_embeds=negative))
    assert counts == {"threshold": 0.01, "computed": 2, "skipped": 2}


@torch.inference_mode()
def test_threshold_zero_computes_even_an_unchanged_input():
    """diffusers skips when the change is not above the threshold; 0 must still mean never skip."""
    transformer, kwargs = tiny_transformer_and_inputs()
    settings = Settings(model="tiny", cache_threshold=0.12)
    stack = Stack([FirstBlockCache(settings)])
    (report,) = stack.apply(SimpleNamespace(transformer=transformer), Hardware("cpu"))
    assert report.status == "applied" and "0.12" in report.detail
    for threshold, expected in ((0.0, (3, 0)), (None, (1, 2))):
        with stack.request(Job(prompt="a cat", seed=0, cache_threshold=threshold)) as run:
            for _ in range(3):
                transformer(**kwargs)
        computed, skipped = expected
        assert run.ran == ["first_block_cache"]
        want = {"threshold": 0.12 if threshold is None else threshold, "computed": computed, "skipped": skipped}
        assert run.counters["first_block_cache"] == want


def test_turned_off_it_reports_no_counts_and_the_calls_run_uncached():
    transformer, kwargs = tiny_transformer_and_inputs()
    stack = Stack([FirstBlockCache(Settings(model="tiny", first_block_cache=False))])
    (report,) = stack.apply(SimpleNamespace(transformer=transformer), Hardware("cpu"))
    assert report.status == "skipped" and "FLUX_FIRST_BLOCK_CACHE=false" in report.detail
    with torch.inference_mode(), stack.request(Job(prompt="a cat", seed=0, cache_threshold=1.0)) as run:
        first, second = (transformer(**kwargs)[0] for _ in range(2))
    assert run.counters == {"first_block_cache": None} and run.ran == []
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@torch.inference_mode()
def test_a_threshold_that_cannot_skip_reads_nothing_back_from_the_device(monkeypatch):
    """At threshold 0 the decision is "compute" without reading the residual's change back (on a GPU, ``.item()``
    is a synchronization per step); at a positive threshold every call after the first reads it once."""
    transformer, kwargs = tiny_transformer_and_inputs()
    cache = FirstBlockCacheControl(transformer, threshold=0.12)
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    for threshold, expected_reads in ((0.0, 0), (0.12, 2), (0.0, 0)):
        reads.clear()
        with cache.request(threshold, RequestRun()):
            for _ in range(3):
                transformer(**kwargs)
            assert cache.summary()["computed"] + cache.summary()["skipped"] == 3
        assert len(reads) == expected_reads, threshold
