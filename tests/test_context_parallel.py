"""Context parallelism on the CPU: two ranks in a gloo process group, the tiny model.

The sharded transformer's output equals one process's (token counts that divide two ranks and ones that do not,
text and image); the parallel service (FLUX_PARALLEL=2) answers with the one-process service's images, reports its
ranks in /health, turns readiness 503 when a rank is killed, and stops cleanly on SIGTERM. The watchdog's rules on
a store written by hand: a rank frozen, hung, failed or exited.
"""

from __future__ import annotations

import json
import os
import signal
import time
import types

import httpx
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from flux_kontext.parallel.control import Watchdog
from flux_kontext.parallel.ranks import rank_environment
from flux_kontext.parallel.sharding import SequencePlan, split_sizes
from flux_kontext.settings import Settings
from tests.conftest import decode_b64_image, image_b64
from tests.live_server import free_port, live_process
from tests.parallel_worker import CASES, FakeFp8Choice, fp8_inputs, outputs, rank_main, stack_on, tiny_transformer


def test_split_is_contiguous_and_as_even_as_it_goes():
    assert split_sizes(4385, 2) == (2193, 2192)
    assert split_sizes(8704, 8) == (1088,) * 8
    plan = SequencePlan.for_lengths(1, 4, 7, 4042)
    assert plan.joint == (2 + 1011, 2 + 1011, 2 + 1010, 1 + 1010) and not plan.even


def test_the_sharded_transformer_equals_one_process(tmp_path):
    """Two gloo ranks run the tiny transformer through the context_parallel optimization, eager and with each block
    compiled (fullgraph: the all-to-alls trace): each output equals the one-process output within float noise, at
    token counts that divide two ranks and ones that do not. The FP8 path (e4m3 q/k/v with per-head descales, as the
    fused blocks hand it) equals one process's FP8 attention within e4m3's rounding of v."""
    path = str(tmp_path / "rank0.pt")
    mp.spawn(rank_main, args=(2, free_port(), path), nprocs=2)
    sharded = torch.load(path)
    transformer = tiny_transformer()
    stack_on(transformer, Settings(model="tiny", device="cpu", first_block_cache=False))
    single = outputs(transformer)
    for mode, cases in (("eager", CASES), ("compiled", CASES[-1:])):
        for case, got, expected in zip(cases, sharded[mode], single[-len(cases) :], strict=True):
            assert got.shape == expected.shape, (mode, case)
            error = float((got - expected).abs().max())
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (mode, case, error)
    q8, k8, _, v8, q_descale, k_descale, v_descale = fp8_inputs()
    expected = FakeFp8Choice().fp8_call(q8, k8, v8, q_descale, k_descale, v_descale)
    error = float((sharded["fp8"] - expected).norm() / expected.norm())
    assert error < 0.03, error  # v rounded to e4m3 twice (per rank, then per head): a few percent at most


# t2i at 256² (256 image tokens + 64 text: divides two ranks); an edit at 272² from a square input (289 + 4096 context
# image tokens: does not). Per-request switches travel to every rank: a scheduler, a first-block-cache threshold high
# enough to skip steps (every rank must skip the same ones, and the same as one process).
REQUESTS = (
    {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 3, "seed": 5, "scheduler": "euler"},
    {"prompt": "add a moon", "width": 272, "height": 272, "steps": 4, "seed": 7, "image": image_b64(512, 512)}
    | {"cache_threshold": 0.75},
)


def _pixels(body: dict) -> np.ndarray:
    return np.asarray(decode_b64_image(body["images"][0]["image"]), dtype=np.int16)


def _rank(health: dict, rank: int) -> dict:
    return next(entry for entry in health["parallel"]["ranks"] if entry["rank"] == rank)


def test_parallel_service_answers_as_one_process_and_a_killed_rank_turns_readiness_503(client):
    port = str(free_port())
    # A loaded 2-CPU host can starve a heartbeat thread for seconds; the kill is seen by its exit status anyway.
    env = {
        "FLUX_PARALLEL": "2",
        "FLUX_PARALLEL_PORT": port,
        "FLUX_DEVICE": "cpu",
        "FLUX_PARALLEL_HEARTBEAT_TIMEOUT_S": "20",
    }
    with live_process(serve=True, **env) as (
        base,
        _,
        process,
        output,
    ):
        health = httpx.get(f"{base}/health").json()
        assert health["parallel"]["world_size"] == 2 and health["parallel"]["healthy"], health["parallel"]
        assert _rank(health, 1)["state"] == "idle"
        ran = {report["name"]: report["status"] for report in health["optimizations"]}
        assert ran["context_parallel"] == "applied" and ran["first_block_cache"] == "applied"
        for body in REQUESTS:
            parallel = httpx.post(f"{base}/inference", json=body, timeout=120)
            assert parallel.status_code == 200, parallel.text
            single = client.post("/inference", json=body)
            assert single.status_code == 200, single.text
            assert "context_parallel" in parallel.json()["optimizations"]["ran"]
            assert parallel.json()["first_block_cache"] == single.json()["first_block_cache"]
            difference = np.abs(_pixels(parallel.json()) - _pixels(single.json()))
            assert difference.max() <= 1, (body["width"], difference.max())  # float noise: one level at most

        os.kill(_rank(health, 1)["pid"], signal.SIGKILL)
        deadline, ready = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            ready = httpx.get(f"{base}/health/ready")
            if ready.status_code == 503:
                break
            time.sleep(0.2)
        assert ready.status_code == 503, output()
        assert "rank 1" in ready.json()["reason"], ready.json()
        refused = httpx.post(f"{base}/inference", json=REQUESTS[0], timeout=30)
        assert refused.status_code == 503 and "rank 1" in refused.json()["error"]["message"], refused.text
        assert httpx.get(f"{base}/health").json()["parallel"]["healthy"] is False
        assert httpx.get(f"{base}/health/live").status_code == 503  # out of step for good: restart the process

        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, output()


class FakeStore:
    """The store's two reads, from a dict the test writes."""

    def __init__(self):
        self.keys: dict[str, bytes] = {}

    def check(self, keys):
        return all(key in self.keys for key in keys)

    def get(self, key):
        return self.keys[key]

    def write(self, rank: int, **status):
        now = time.time()
        entry = {"rank": rank, "state": "idle", "detail": None, "alive_at": now, "progress_at": now, **status}
        self.keys[f"status/{rank}"] = json.dumps(entry).encode()


class Exited:
    returncode = -9

    def poll(self):
        return self.returncode


@pytest.mark.parametrize(
    ("status", "serving", "expected"),
    [
        ({}, True, None),
        ({"alive_at": time.time() - 60}, True, "stopped responding"),  # killed, or frozen whole (SIGSTOP)
        ({"state": "running", "progress_at": time.time() - 600}, True, "hung"),  # heartbeat alive, no step
        ({"state": "running", "progress_at": time.time() - 600}, False, None),  # warm-up compiles: no limit
        ({"state": "failed", "detail": "CUDA out of memory"}, True, "failed: CUDA out of memory"),
    ],
)
def test_watchdog_names_what_is_wrong_with_a_rank(status, serving, expected):
    store = FakeStore()
    store.write(1, **status)
    watchdog = Watchdog(store, 2, Settings(model="tiny"), on_problem=lambda why: None)
    watchdog.serving = serving
    why = watchdog.check(1)
    assert (why is None) if expected is None else (expected in why), why


def test_watchdog_sees_a_process_it_started_exit():
    store = FakeStore()
    store.write(1)
    watchdog = Watchdog(store, 2, Settings(model="tiny"), on_problem=lambda why: None, processes={1: Exited()})
    assert "rank 1 exited (status -9)" in watchdog.check(1)


def test_heads_that_do_not_divide_make_context_parallel_unavailable():
    """Three ranks for the tiny model's two heads: unavailable, saying why, before any collective (the parallel
    engines then fail the start with it)."""
    group = types.SimpleNamespace(world_size=3, rank=0)
    stack = stack_on(tiny_transformer(), Settings(model="tiny", device="cpu"), group)
    report = stack["context_parallel"].report()
    assert report.status == "unavailable" and "2 heads to divide among 3 ranks" in report.detail


def test_one_process_skips_context_parallel():
    stack = stack_on(tiny_transformer(), Settings(model="tiny", device="cpu"))
    report = stack["context_parallel"].report()
    assert report.status == "skipped" and "one process" in report.detail


def test_flux_parallel_must_agree_with_torchrun():
    environ = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    ranks = rank_environment(Settings(model="tiny"), environ)
    assert (ranks.rank, ranks.world_size, ranks.launcher) == (1, 2, "torchrun")
    with pytest.raises(ValueError, match="FLUX_PARALLEL=4 but WORLD_SIZE=2"):
        rank_environment(Settings(model="tiny", parallel=4), environ)
