"""The warm-up record kept in FLUX_COMPILE_CACHE_DIR (flux_kontext/warmup_record.py): a restart whose compile cache
hits skips the warm-up generations that compiled nothing when they last ran with the same key, and runs everything
otherwise. The record's logic through its public functions, then two engine starts with compile applied on the CPU
(dynamo for real, its eager backend) over one cache directory, /health saying what was skipped and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flux_kontext.engine import Engine
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from flux_kontext.stack import Stack
from flux_kontext.warmup_record import MISSING, SUBDIR, generation_key, open_record
from tests.conftest import wait_ready
from tests.test_warmup_shapes import CompileOnCpu, dynamo_eager  # noqa: F401 (a fixture)

KEY = {"torch": "2.13.0", "gpu": "NVIDIA H200", "model": {"random_seed": 0}}
EDIT = generation_key("edit 1024x1024", 2, {"flags": {}})
TEXT = generation_key("text_to_image 1024x1024", 2, {"flags": {}})
NO_GRAPHS = generation_key("edit 1024x1024", 2, {"flags": {"use_cuda_graphs": False}})


def settings_for(cache_dir: Path, **overrides) -> Settings:
    return Settings(model="tiny", compile_cache_dir=str(cache_dir), **overrides)


def first_start(settings: Settings, key: dict = KEY) -> Path:
    """A cold start's warm-up: the edit compiled, text-to-image and a switch variant compiled nothing."""
    record = open_record(settings, key, "cold")
    assert record.skip_reason(TEXT) is None  # cold: nothing is skipped
    record.ran(EDIT, graphs_compiled=4, cuda_graphs_captured=57, seconds=55.0)
    record.ran(TEXT, graphs_compiled=0, cuda_graphs_captured=57, seconds=0.5)
    record.ran(NO_GRAPHS, graphs_compiled=0, cuda_graphs_captured=0, seconds=0.4)
    record.save()
    (path,) = (Path(settings.compile_cache_dir) / SUBDIR).glob("*.json")
    return path


def test_a_restart_on_a_hit_skips_what_compiled_nothing_and_runs_what_compiled(tmp_path):
    settings = settings_for(tmp_path)
    first_start(settings)
    again = open_record(settings, KEY, "hit")
    assert again.skip_reason(EDIT) is None  # it reloads cached graphs: it must run
    assert again.skip_reason(TEXT).startswith(
        "compiled nothing on 20"
    ) and "with this fingerprint" in again.skip_reason(TEXT)
    assert "captured on its shape's first request" in again.skip_reason(TEXT)
    assert "captured" not in again.skip_reason(NO_GRAPHS)
    assert again.skip_reason(generation_key("edit 1024x1024 x2", 1, {"flags": {}})) is None  # never ran: runs
    assert again.report()["skipping"] is True and again.report()["why_not"] is None


def test_a_skipped_generation_keeps_the_date_it_last_ran(tmp_path):
    settings = settings_for(tmp_path)
    path = first_start(settings)
    ran_at = json.loads(path.read_text())["generations"][TEXT]["ran_at"]
    second = open_record(settings, KEY, "hit")
    second.skipped(TEXT, second.skip_reason(TEXT))
    second.ran(EDIT, graphs_compiled=4, cuda_graphs_captured=57, seconds=10.0)  # reloaded
    second.save()
    third = open_record(settings, KEY, "hit")
    assert third.skip_reason(TEXT) == f"compiled nothing on {ran_at} with this fingerprint" + (
        " (its 57 CUDA graph(s) are captured on its shape's first request)"
    )
    assert third.skip_reason(EDIT) is None


@pytest.mark.parametrize("cache", ["cold", "process default"])
def test_nothing_is_skipped_unless_the_compile_cache_hit(tmp_path, cache):
    settings = settings_for(tmp_path)
    first_start(settings)
    record = open_record(settings, KEY, cache)
    assert record.skip_reason(TEXT) is None and record.report()["skipping"] is False
    assert record.report()["why_not"].startswith(f"compile cache {cache}")


def test_another_fingerprint_or_other_settings_run_everything_and_the_log_level_does_not(tmp_path):
    first_start(settings_for(tmp_path))
    other_gpu = open_record(settings_for(tmp_path), {**KEY, "gpu": "NVIDIA H100"}, "hit")
    assert other_gpu.skip_reason(TEXT) is None
    assert other_gpu.report()["record"] == MISSING  # one file per key
    other_plan = open_record(settings_for(tmp_path, warmup_shapes="all"), KEY, "hit")
    assert other_plan.skip_reason(TEXT) is None and other_plan.report()["record"] == MISSING
    assert open_record(settings_for(tmp_path, log_level="DEBUG"), KEY, "hit").skip_reason(TEXT) is not None


def test_a_file_whose_key_says_otherwise_is_not_used(tmp_path):
    settings = settings_for(tmp_path)
    path = first_start(settings)
    content = json.loads(path.read_text())
    content["key"]["gpu"] = "NVIDIA H100"  # a hand edit, or a hash collision
    path.write_text(json.dumps(content))
    record = open_record(settings, KEY, "hit")
    assert record.skip_reason(TEXT) is None and record.report()["record"] == "for another key (differs in gpu)"


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"format": 1}',
        "",
    ],
)
def test_an_unreadable_record_runs_everything_and_is_rewritten(tmp_path, content):
    settings = settings_for(tmp_path)
    path = first_start(settings)
    path.write_text(content)
    record = open_record(settings, KEY, "hit")
    assert record.skip_reason(TEXT) is None and record.skip_reason(NO_GRAPHS) is None
    assert record.report()["skipping"] is False and record.report()["why_not"].startswith("the record is ")
    record.ran(TEXT, graphs_compiled=0, cuda_graphs_captured=0, seconds=0.5)
    record.save()
    assert open_record(settings, KEY, "hit").skip_reason(TEXT) is not None


def test_an_entry_with_a_wrong_type_makes_the_record_unreadable(tmp_path):
    settings = settings_for(tmp_path)
    path = first_start(settings)
    content = json.loads(path.read_text())
    content["generations"][TEXT]["graphs_compiled"] = "0"
    path.write_text(json.dumps(content))
    record = open_record(settings, KEY, "hit")
    assert record.skip_reason(TEXT) is None and record.report()["record"].startswith("unreadable")


def test_the_setting_off_a_retry_after_an_undo_or_no_compile_skip_nothing(tmp_path):
    first_start(settings_for(tmp_path))
    off = open_record(settings_for(tmp_path, warmup_skip_cached=False), KEY, "hit")
    assert off.skip_reason(TEXT) is None and "FLUX_WARMUP_SKIP_CACHED=false" in off.report()["why_not"]
    retry = open_record(settings_for(tmp_path), KEY, "hit", retry=True)
    assert retry.skip_reason(TEXT) is None and not retry.enabled  # and it keeps nothing
    no_compile = open_record(settings_for(tmp_path), KEY, None)
    assert no_compile.skip_reason(TEXT) is None and not no_compile.enabled
    unset = open_record(Settings(model="tiny"), {}, "hit")
    assert unset.skip_reason(TEXT) is None and "FLUX_COMPILE_CACHE_DIR unset" in unset.report()["why_not"]


# ----- two engine starts over one cache directory, compile applied on the CPU -------------------------------------
@pytest.fixture
def cache_variables(monkeypatch):
    """compile_cache points Inductor's and Triton's variables at the cache directory: restored after the test."""
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(variable, "/before/the/test")
    monkeypatch.delenv("TORCH_WARM_POOL", raising=False)  # a hit sets it


def started(settings: Settings) -> tuple[TestClient, dict]:
    client = TestClient(create_app(settings, lambda s: Engine(s, Stack([CompileOnCpu(s)]))))
    client.__enter__()
    return client, wait_ready(client, timeout_s=300)


def compile_data(health: dict) -> dict:
    return next(r for r in health["optimizations"] if r["name"] == "compile")["data"]


def test_a_restart_on_a_hit_skips_text_to_image_and_health_says_why(tmp_path, dynamo_eager, cache_variables):  # noqa: F811
    import torch

    settings = settings_for(tmp_path, warmup_shapes="minimal", first_block_cache=False)
    client, first = started(settings)
    try:
        assert compile_data(first)["cache"] == "cold"
        warmup = first["shapes"]["warmup"]
        assert warmup["skipping"] is False and warmup["skipped"] == {}
        text = generation_key("text_to_image 1024x1024", 2, {"flags": {}})
        edit = generation_key("edit 1024x1024", 2, {"flags": {}})
        assert warmup["ran"][edit]["graphs_compiled"] > 0 and warmup["ran"][text]["graphs_compiled"] == 0
    finally:
        client.__exit__(None, None, None)
    # What Inductor would have left in the fingerprint's directory (dynamo's eager backend writes nothing there).
    (Path(compile_data(first)["cache_dir"]) / "inductor" / "artifact").write_text("compiled")
    torch._dynamo.reset()  # a new process: nothing compiled in memory
    client, second = started(settings)
    try:
        assert compile_data(second)["cache"] == "hit"
        warmup = second["shapes"]["warmup"]
        assert warmup["skipping"] is True and list(warmup["skipped"]) == [text]
        assert warmup["skipped"][text].startswith("compiled nothing on 20")
        assert list(warmup["ran"]) == [edit] and warmup["ran"][edit]["graphs_compiled"] > 0  # reloaded, ran
        shapes = second["shapes"]
        assert shapes["warmed"]["text_to_image 1024x1024"]["skipped"] == warmup["skipped"][text]
        assert shapes["preferred"]["text_to_image"]["1024x1024"]["code"] == "compiled"
        response = client.post("/inference", json={"prompt": "a boat", "width": 1024, "height": 1024, "steps": 1})
        assert response.status_code == 200, response.text
        after = client.get("/health").json()["shapes"]["compiled_after_ready"]
        assert after == {"requests": 0, "graphs_by_shape": {}}  # the skipped shape needed nothing compiled
    finally:
        client.__exit__(None, None, None)
