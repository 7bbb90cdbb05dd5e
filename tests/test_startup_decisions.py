"""Start-up decisions kept in FLUX_COMPILE_CACHE_DIR (flux_kontext/startup_decisions.py), on CPU.

The engine runs the tiny model with the FP8 GEMM screen (low_precision_gemm) as on a Hopper GPU: the hardware the
stack sees is an H200 and torchao's ``quantize_`` is a recording fake (torchao is a GPU package; the screen itself,
rowwise e4m3 quantize-dequantize, runs on CPU). What is checked: the decisions file is written, a second engine start
with the same key reads the screen's choice back and applies it, a changed key part measures again, and /health and
the optimization's report say which (and when the decision was measured)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from flux_kontext.device import Device
from flux_kontext.engine import Engine
from flux_kontext.models import build_random_pipeline
from flux_kontext.optimizations.attention import selection
from flux_kontext.optimizations.attention.kernels import sdpa
from flux_kontext.service import create_app
from flux_kontext.settings import Settings
from flux_kontext.stack import Hardware, stack_for
from flux_kontext.startup_decisions import DecisionCache, open_decisions, weights_identity
from tests.conftest import wait_ready
from tests.test_fused_fp8 import _emulated_flash_attn_func

H200 = Hardware("cuda", (9, 0), "NVIDIA H200")


class RecordingQuantize:
    """torchao's ``quantize_`` stand-in: records the layers its filter selects, leaves them as they are."""

    def __init__(self):
        self.calls: list[set[str]] = []

    def __call__(self, root, config, filter_fn):
        self.calls.append({name for name, module in root.named_modules() if filter_fn(module, name)})


@pytest.fixture
def quantize(monkeypatch):
    fake = RecordingQuantize()
    quantization = types.ModuleType("torchao.quantization")
    quantization.quantize_ = fake
    quantization.Float8DynamicActivationFloat8WeightConfig = lambda **kwargs: ("fp8", kwargs)
    quantization.PerRow = lambda: "per-row"
    torchao = types.ModuleType("torchao")
    torchao.quantization = quantization
    monkeypatch.setitem(sys.modules, "torchao", torchao)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    return fake


@pytest.fixture
def on_h200(monkeypatch):
    """The stack decides for an H200 (the tensors stay on the CPU)."""
    monkeypatch.setattr(Device, "for_stack", lambda self: H200)


def settings_for(cache_dir: Path, **overrides) -> Settings:
    return Settings(model="tiny", compile_cache_dir=str(cache_dir), **overrides)


def start(settings: Settings) -> Engine:
    """One engine start with the FP8 GEMM screen in its stack."""
    engine = Engine(settings, stack_for(settings, only=["low_precision_gemm"]))
    engine.load()
    assert engine.ready, engine.reason
    return engine


def gemm_report(engine: Engine):
    return next(report for report in engine.reports if report.name == "low_precision_gemm")


def selected_names(screened: dict) -> set[str]:
    """The layers each block's screen selected, named inside their block (as ``quantize_`` sees them)."""
    return {name.removeprefix(f"{part}.") for part, value in screened.items() for name in value["selected"]}


def decision_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "decisions").glob("*.json"))


def test_a_first_start_measures_and_writes_the_decisions_a_second_reads_them_back(tmp_path, quantize, on_h200):
    first = start(settings_for(tmp_path))
    assert first.describe_decisions()["decisions"] == "cold"
    [kept] = decision_files(tmp_path)
    written = json.loads(kept.read_text())
    assert written["key"]["gpu"] == "NVIDIA H200" and written["key"]["torch"] == torch.__version__
    assert written["key"]["model"]["kind"] == "tiny" and written["key"]["model"]["random_seed"] == 0
    screened = {part: entry["value"] for part, entry in written["decisions"]["low_precision_gemm"].items()}
    assert set(screened) == {"transformer_blocks.0", "single_transformer_blocks.0"}  # one per block, at load
    report = gemm_report(first)
    assert report.status == "applied" and report.data["decisions"]["cached"] is False
    assert "read back" not in report.detail
    measured_selection = set().union(*quantize.calls)
    assert measured_selection == selected_names(screened)

    quantize.calls.clear()
    second = start(settings_for(tmp_path))
    health = second.describe_decisions()
    assert health["decisions"] == "hit" and health["measured_now"] == []
    assert set(health["read_back"]) == {f"low_precision_gemm/{part}" for part in screened}
    report = gemm_report(second)
    measured_at = max(entry["measured_at"] for entry in written["decisions"]["low_precision_gemm"].values())
    assert report.data["decisions"]["cached"] is True and report.data["decisions"]["measured_at"] == measured_at
    assert f"read back from the kept cache (measured {measured_at})" in report.detail
    assert set().union(*quantize.calls) == measured_selection  # the same layers quantized
    assert decision_files(tmp_path) == [kept]


def test_what_a_second_start_applies_is_the_kept_decision(tmp_path, quantize, on_h200):
    start(settings_for(tmp_path))
    [kept] = decision_files(tmp_path)
    content = json.loads(kept.read_text())
    entry = content["decisions"]["low_precision_gemm"]["single_transformer_blocks.0"]["value"]
    moved = entry["selected"].pop()  # as if the screen had found this layer's FP8 error too high
    entry["kept_bf16"][moved] = 0.5
    kept.write_text(json.dumps(content))
    quantize.calls.clear()
    report = gemm_report(start(settings_for(tmp_path)))
    assert moved.removeprefix("single_transformer_blocks.0.") not in quantize.calls[1]
    assert len(quantize.calls[1]) == len(entry["selected"])
    assert report.data["kept_bf16"][moved] == 0.5 and report.data["decisions"]["cached"] is True


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"fp8_max_layer_error": 0.5}, id="a decision setting"),
        pytest.param({"dtype": "bfloat16"}, id="the dtype"),
    ],
)
def test_a_changed_setting_measures_again_into_its_own_file(tmp_path, quantize, on_h200, change):
    start(settings_for(tmp_path))
    again = start(settings_for(tmp_path, **change))
    assert again.describe_decisions()["decisions"] == "cold"
    assert gemm_report(again).data["decisions"]["cached"] is False
    assert len(decision_files(tmp_path)) == 2


def test_another_gpu_or_torch_measures_again(tmp_path, quantize, monkeypatch):
    monkeypatch.setattr(Device, "for_stack", lambda self: H200)
    start(settings_for(tmp_path))
    monkeypatch.setattr(Device, "for_stack", lambda self: Hardware("cuda", (9, 0), "NVIDIA H100 80GB HBM3"))
    assert start(settings_for(tmp_path)).describe_decisions()["decisions"] == "cold"
    monkeypatch.setattr(Device, "for_stack", lambda self: H200)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert start(settings_for(tmp_path)).describe_decisions()["decisions"] == "cold"
    assert len(decision_files(tmp_path)) == 3


def test_a_file_of_another_key_is_not_trusted(tmp_path, quantize, on_h200):
    start(settings_for(tmp_path))
    [kept] = decision_files(tmp_path)
    content = json.loads(kept.read_text())
    content["key"]["gpu"] = "someone else's GPU"  # a hand edit, or a hash collision
    kept.write_text(json.dumps(content))
    engine = start(settings_for(tmp_path))
    assert engine.describe_decisions()["decisions"] == "cold"
    assert json.loads(kept.read_text())["key"]["gpu"] == "NVIDIA H200"  # rewritten with this start's key


def test_changed_weight_files_change_the_key(tmp_path):
    folder = tmp_path / "kontext" / "transformer"
    folder.mkdir(parents=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"one")
    before = weights_identity(str(tmp_path / "kontext"))
    assert before["files"][0][0] == "transformer/diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"other")
    after = weights_identity(str(tmp_path / "kontext"))
    assert before != after
    settings = settings_for(tmp_path / "cache")
    paths = {open_decisions(settings, H200, torch.bfloat16, {"weights": w}).path for w in (before, after)}
    assert len(paths) == 2


def test_without_a_cache_directory_every_start_measures_and_says_so(quantize, on_h200):
    engine = start(Settings(model="tiny"))
    state = engine.describe_decisions()
    assert state["decisions"] == "off" and "FLUX_COMPILE_CACHE_DIR unset" in state["why"]
    assert gemm_report(engine).data["decisions"] == {"cached": False, "why": state["why"]}


def test_health_reports_the_decisions_and_the_start_phases(tmp_path, quantize, on_h200):
    settings = settings_for(tmp_path)

    def factory(settings):
        return Engine(settings, stack_for(settings, only=["low_precision_gemm"]))

    for expected in ("cold", "hit"):
        with TestClient(create_app(settings, engine_factory=factory)) as client:
            health = wait_ready(client)
        assert health["startup_decisions"]["decisions"] == expected
        assert health["startup_decisions"]["file"] == str(decision_files(tmp_path)[0])
        gemm = next(r for r in health["optimizations"] if r["name"] == "low_precision_gemm")
        assert gemm["data"]["decisions"]["cached"] is (expected == "hit")
        phases = health["startup_seconds"]
        assert {"interpreter_and_imports", "before_load", "load_model", "optimize", "warm_up"} <= set(phases)


def test_the_store_reports_partial_when_only_some_decisions_were_kept(tmp_path):
    store = DecisionCache(tmp_path / "d.json", {"k": 1})
    store.put("attention", {"best": "cudnn"}, "kernels")
    store.save()
    again = DecisionCache(tmp_path / "d.json", {"k": 1})
    assert again.get("attention", "kernels").value == {"best": "cudnn"}
    value, cached = again.cached_or_measured("attention", lambda: {"screen": 1}, "fp8_screen")
    assert value == {"screen": 1} and cached is None
    assert again.report()["decisions"] == "partial"
    assert again.describe("attention")["cached"] is False  # part of it measured now: not called cached
    refused, cached = again.cached_or_measured("attention", lambda: {"best": "sdpa"}, "kernels", valid=lambda v: False)
    assert refused == {"best": "sdpa"} and cached is None  # a kept decision that no longer fits is measured again


def test_a_fallback_the_caller_does_not_keep_is_neither_stored_nor_reported_as_measured(tmp_path):
    store = DecisionCache(tmp_path / "d.json", {"k": 1})
    fallback = {"why": "not a CUDA device"}
    value, cached = store.cached_or_measured("lora", lambda: fallback, "up_kernel", keep=lambda v: False)
    assert value == fallback and cached is None
    store.save()
    assert not (tmp_path / "d.json").exists() and store.report()["decisions"] == "none measured"


# --- attention: the kernels' timing and the FP8 attention screen ---------------------------------------------------


class CountingTimer:
    """``gpu_milliseconds`` stand-in: a fixed figure per call (sdpa, then FA3, ... in call order), counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, repeats=20, warmup=1):
        self.calls += 1
        return 1.0 + 0.1 * self.calls


class EmulatedFa3:
    """FA3's ``flash_attn_func`` emulated on CPU (FP8 inputs dequantized with their descales), counted."""

    def __init__(self):
        self.fp8_calls = 0

    def __call__(self, q, k, v, q_descale=None, k_descale=None, v_descale=None):
        if q_descale is None:
            return sdpa(q, k, v)
        self.fp8_calls += 1
        return _emulated_flash_attn_func(q, k, v, q_descale, k_descale, v_descale)


def start_attention(settings: Settings, fa3: EmulatedFa3):
    """One start of attention's GPU path (as on an H200) on the tiny transformer, with this start's decisions."""
    pipe = build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)
    stack = stack_for(settings, only=["attention", "flash_attention_3"])
    decisions = open_decisions(settings, H200, torch.float32, {"kind": "tiny", "random_seed": 0})
    stack.use_decisions(decisions)
    reports = {report.name: report for report in stack.apply(pipe, H200)}
    decisions.save()
    calls_during_apply = fa3.fp8_calls
    return reports, decisions, calls_during_apply


def test_attention_timing_and_fp8_screen_are_read_back_on_a_restart(tmp_path, monkeypatch):
    timer, fa3 = CountingTimer(), EmulatedFa3()
    monkeypatch.setattr(selection, "gpu_milliseconds", timer)
    monkeypatch.setattr(selection, "load_fa3", lambda: (fa3, "fa3-fwd"))
    settings = Settings(model="tiny", compile_cache_dir=str(tmp_path), cuda_graphs=False)
    first, decisions, screened_calls = start_attention(settings, fa3)
    assert first["attention"].status == "applied", first["attention"].detail
    assert decisions.report()["decisions"] == "cold" and timer.calls > 0 and screened_calls > 0
    assert first["attention"].data["decisions"]["cached"] is False
    fp8_policy = first["flash_attention_3"].data.get("fp8_policy")

    timer.calls, fa3.fp8_calls = 0, 0
    second, decisions, screened_calls = start_attention(settings, fa3)
    assert decisions.report()["decisions"] == "hit"
    assert set(decisions.report()["read_back"]) == {"attention/kernels", "attention/fp8_screen"}
    assert timer.calls == 0 and screened_calls == 0  # nothing timed, no FP8 screen run
    report = second["attention"]
    assert report.data["decisions"]["cached"] is True and "read back from the kept cache" in report.detail
    assert report.detail.split(";")[0] == first["attention"].detail.split(";")[0]  # the same kernel chosen
    assert second["flash_attention_3"].data.get("fp8_policy") == fp8_policy
    assert report.data["measured"] == first["attention"].data["measured"]
