"""FLUX_COMPILE_CACHE_DIR on CPU: compile applied through the stack with a recording stand-in for torch.compile
(nothing is compiled); what is checked is the directory, its fingerprint.json, the variables Inductor and Triton
read, and the report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from flux_kontext.models import build_random_pipeline
from flux_kontext.settings import Settings
from flux_kontext.stack import Hardware, stack_for
from tests.test_optimizations import RecordingCompile

HOPPER = Hardware("cuda", (9, 0), "NVIDIA H200")
VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@pytest.fixture(autouse=True)
def _fake_compile_and_restored_variables(monkeypatch):
    monkeypatch.setattr(torch, "compile", RecordingCompile())
    for variable in VARIABLES:  # set back (or removed) after each test
        monkeypatch.setenv(variable, "/before/the/test")
    monkeypatch.delenv("TORCH_WARM_POOL", raising=False)  # a hit sets it: removed again after each test


def tiny_pipe():
    return build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)


def apply_compile(hardware=HOPPER, **settings):
    """One start: a fresh pipeline (each Stack owns its pipeline's forward slots), compile applied."""
    stack = stack_for(Settings(model="tiny", **settings), only=["compile"])
    [report] = stack.apply(tiny_pipe(), hardware)
    assert report.status == "applied", report.detail
    return report


def fingerprint_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_the_fingerprints_directory_is_made_with_its_readable_fields_and_the_caches_point_inside(tmp_path):
    report = apply_compile(compile_cache_dir=str(tmp_path))
    [directory] = fingerprint_dirs(tmp_path)
    written = json.loads((directory / "fingerprint.json").read_text())
    assert report.data["cache"] == "cold" and report.data["cache_dir"] == str(directory)
    assert written == report.data["fingerprint"]
    assert written["torch"] == torch.__version__ and written["gpu"] == "NVIDIA H200"
    assert written["capability"] == [9, 0] and written["dtype"] == "float32"
    assert written["settings"]["low_precision_gemm"] == "auto" and written["settings"]["fused_norm_rope"] is True
    assert {"python", "cuda", "triton"} <= set(written)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(directory / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(directory / "triton")
    assert (directory / "inductor").is_dir() and (directory / "triton").is_dir()
    assert "cold" in report.detail and str(directory) in report.detail
    assert "cache" in report.public()["data"]  # what /health shows


def test_a_second_start_on_the_same_fingerprint_reports_a_hit_once_inductor_wrote_something(tmp_path):
    first = apply_compile(compile_cache_dir=str(tmp_path))
    assert apply_compile(compile_cache_dir=str(tmp_path)).data["cache"] == "cold"  # created, still empty
    artifact = Path(first.data["cache_dir"]) / "inductor" / "fxgraph" / "ab" / "entry"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"compiled")
    again = apply_compile(compile_cache_dir=str(tmp_path))
    assert again.data["cache"] == "hit" and again.data["cache_dir"] == first.data["cache_dir"]
    assert "hit" in again.detail
    assert len(fingerprint_dirs(tmp_path)) == 1


def test_on_a_hit_inductors_compile_workers_start_on_demand_unless_the_operator_chose(tmp_path, monkeypatch):
    first = apply_compile(compile_cache_dir=str(tmp_path))
    assert "compile_workers" not in first.data and "TORCH_WARM_POOL" not in os.environ  # cold: torch's default
    artifact = Path(first.data["cache_dir"]) / "inductor" / "fxgraph" / "ab" / "entry"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"compiled")
    hit = apply_compile(compile_cache_dir=str(tmp_path))
    assert hit.data["cache"] == "hit" and os.environ["TORCH_WARM_POOL"] == "0"
    assert hit.data["compile_workers"].startswith("started when a kernel must compile")
    monkeypatch.setenv("TORCH_WARM_POOL", "1")  # the operator's choice
    again = apply_compile(compile_cache_dir=str(tmp_path))
    assert os.environ["TORCH_WARM_POOL"] == "1" and "TORCH_WARM_POOL=1" in again.data["compile_workers"]


def test_settings_that_change_the_generated_code_get_another_directory(tmp_path):
    default = apply_compile(compile_cache_dir=str(tmp_path))
    bf16_gemms = apply_compile(compile_cache_dir=str(tmp_path), low_precision_gemm="none")
    other_gpu = apply_compile(Hardware("cuda", (10, 0), "NVIDIA B200"), compile_cache_dir=str(tmp_path))
    dirs = {default.data["cache_dir"], bf16_gemms.data["cache_dir"], other_gpu.data["cache_dir"]}
    assert len(dirs) == 3 and len(fingerprint_dirs(tmp_path)) == 3
    assert bf16_gemms.data["fingerprint"]["settings"]["low_precision_gemm"] == "none"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(Path(other_gpu.data["cache_dir"]) / "inductor")


def test_a_directory_whose_fingerprint_json_does_not_match_is_not_reused(tmp_path):
    first = apply_compile(compile_cache_dir=str(tmp_path))
    directory = Path(first.data["cache_dir"])
    edited = dict(first.data["fingerprint"], torch="0.0.1")  # a hand edit, or another torch's hash collision
    (directory / "fingerprint.json").write_text(json.dumps(edited))
    (directory / "inductor" / "entry").write_bytes(b"someone else's code")
    second = apply_compile(compile_cache_dir=str(tmp_path))
    assert second.data["cache_dir"] == f"{directory}-1" and second.data["cache"] == "cold"
    assert "not used" in second.data["cache_dir_not_reused"] and "torch" in second.data["cache_dir_not_reused"]
    assert "not used" in second.detail
    assert json.loads((directory / "fingerprint.json").read_text()) == edited  # left as it was
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == f"{directory}-1/inductor"
    # The next start finds its own directory again.
    assert apply_compile(compile_cache_dir=str(tmp_path)).data["cache_dir"] == f"{directory}-1"


def test_an_unusable_directory_leaves_compile_applied_on_the_default_caches_and_says_why(tmp_path):
    regular_file = tmp_path / "a-file"
    regular_file.write_text("")
    report = apply_compile(compile_cache_dir=str(regular_file / "cache"))
    assert report.data["cache"] == "process default" and report.data["cache_dir"] is None
    assert "a-file" in report.data["cache_dir_error"] and "unusable" in report.detail
    assert all(os.environ[variable] == "/before/the/test" for variable in VARIABLES)  # not touched


def test_without_the_setting_the_report_says_the_caches_are_the_process_defaults():
    report = apply_compile()
    assert report.data["cache"] == "process default" and report.data["cache_dir"] is None
    assert "not kept by the service" in report.detail
    assert all(os.environ[variable] == "/before/the/test" for variable in VARIABLES)


def test_decide_stays_model_free_and_the_cpu_path_touches_no_cache(tmp_path):
    stack = stack_for(Settings(model="tiny", compile_cache_dir=str(tmp_path)), only=["compile"])
    assert stack["compile"].decide(HOPPER).go
    [report] = stack.apply(tiny_pipe(), Hardware("cpu"))
    assert report.status == "skipped" and list(tmp_path.iterdir()) == []
