"""deploy/: the Kubernetes manifest agrees with the app (probe paths, ports, drain timing, settings, GPU, cache
volume), and `make -n test` is the README's test command. No cluster and no Docker daemon: the files are read."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml
from fastapi.testclient import TestClient

import flux_kontext_optimized
from flux_kontext.service import STOP_WAIT_S, create_app
from flux_kontext.settings import Settings
from tests.live_server import ROOT

COLD_COMPILE_WINDOW_S = 600  # a cold start with compile must fit in the startup probe (BENCHMARKS.md: 104 s on H200)


@pytest.fixture(scope="module")
def deployment() -> dict:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    return next(doc for doc in documents if doc["kind"] == "Deployment")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def test_probes_are_the_apps_health_routes_on_its_port(container):
    # The app before its start (no lifespan: nothing loads): live answers, ready holds the pod back.
    client = TestClient(create_app(Settings(model="tiny", warmup=False)))
    answers = {"/health/live": 200, "/health/ready": 503}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    command = container["command"]
    assert command[command.index("--port") + 1] == str(ports["http"])
    expected = {"startupProbe": "/health/ready", "readinessProbe": "/health/ready", "livenessProbe": "/health/live"}
    for probe, path in expected.items():
        check = container[probe]["httpGet"]
        assert check["path"] == path, probe
        assert client.get(path).status_code == answers[path], probe
        assert check["port"] in ports or check["port"] in ports.values(), probe


def test_the_startup_probe_leaves_room_for_a_cold_compile(container):
    startup = container["startupProbe"]
    window = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert window >= COLD_COMPILE_WINDOW_S
    assert container["readinessProbe"].get("failureThreshold", 3) == 1  # draining is seen at the next probe


def test_the_grace_period_covers_prestop_and_the_whole_drain(deployment, container, monkeypatch):
    pod = deployment["spec"]["template"]["spec"]
    for name, value in env_of(container).items():
        monkeypatch.setenv(name, value)
    drain_s = Settings().drain_timeout_s  # the manifest's FLUX_DRAIN_TIMEOUT_S, or the default
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + drain_s + STOP_WAIT_S + flux_kontext_optimized.SHUTDOWN_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > needed
    assert "serve" in container["command"]  # the draining server; plain uvicorn closes the listener at once


def test_every_flux_setting_in_the_manifest_is_a_real_setting_with_a_valid_value(container, monkeypatch):
    known = set()
    for name, field in Settings.model_fields.items():
        known.add(name)
        if field.validation_alias is not None:
            known.update(getattr(field.validation_alias, "choices", [field.validation_alias]))
    flux = {name: value for name, value in env_of(container).items() if name.startswith("FLUX_")}
    assert "FLUX_COMPILE_CACHE_DIR" in flux and "FLUX_DRAIN_TIMEOUT_S" in flux
    for name, value in flux.items():
        assert name.removeprefix("FLUX_").lower() in known, name
        monkeypatch.setenv(name, value)
    Settings()  # raises on a value the service would refuse at start


def test_one_gpu_and_the_compile_cache_on_a_persistent_volume(deployment, container):
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    cache_dir = env_of(container)["FLUX_COMPILE_CACHE_DIR"]
    mount = next(m for m in container["volumeMounts"] if cache_dir.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert "persistentVolumeClaim" in volume


def readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"Run the tests and the lint[^\n]*\n+```bash\n(.+?)\n```", readme)
    assert match, "README lost its test command"
    return match.group(1).strip()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_is_the_readme_test_command():
    environment = {key: value for key, value in os.environ.items() if key not in ("VENV", "MAKEFLAGS")}
    printed = subprocess.run(
        ["make", "-n", "test"], cwd=ROOT, env=environment, capture_output=True, text=True, check=True
    ).stdout
    assert printed.strip() == readme_test_command()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_has_the_everyday_targets():
    for target in ("setup", "serve", "test", "lint", "bench"):
        completed = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert completed.returncode == 0 and completed.stdout.strip(), target
