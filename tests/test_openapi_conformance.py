"""The OpenAPI document matches what the service does: schemathesis (its CLI) against a live server with the tiny
model, on a bounded budget (a few examples per operation, a fixed seed).

Two runs:
- every operation that does not generate, all modes and all checks;
- the operations that generate (/inference, the OpenAI image routes, /v1/jobs, /benchmark) with negative data only:
  each must be rejected with a documented 4xx, never a 5xx. Schema-valid data there runs a real generation (seconds
  each on the tiny model at 1024², minutes for a fuzzing budget): the functional tests cover those (test_inference,
  test_openai_images, test_async_jobs).

Checks left out, as intended:
- ``ignored_auth``/``missing_required_header``: no keys are configured here (test_auth covers the keyed service);
- ``use_after_free``/``ensure_resource_availability``: stateful checks for resources the fuzzer creates; jobs are
  created only by the generation routes, which get negative data only here.
- ``positive_data_acceptance`` on the generating operations: the request models have cross-field rules the document
  does not express (width and height both or neither; aspect_ratio not with them; output_quality not with png; a
  DPM scheduler needs use_dpm_solver), so a "schema-valid" request can get a 422, which names the rule.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live_server import live_server

GENERATING = r"^/(inference|v1/images/.*|v1/jobs|benchmark)$"
EXCLUDED = "ignored_auth,missing_required_header,use_after_free,ensure_resource_availability"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def schemathesis(base: str, *options: str, excluded: str = EXCLUDED) -> subprocess.CompletedProcess:
    command = [str(SCHEMATHESIS) if SCHEMATHESIS.exists() else shutil.which("schemathesis") or "schemathesis"]
    command += ["run", f"{base}/openapi.json", "--checks", "all", "--exclude-checks", excluded, "--seed", "13"]
    command += ["--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-color", "--request-timeout", "120"]
    command += ["--generation-database", "none", "--max-response-time", "120", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def server():
    with live_server(FLUX_WARMUP="false", FLUX_MAX_QUEUE="4") as (base, _):
        yield base


def test_every_non_generating_operation_conforms(server):
    run = schemathesis(server, "--max-examples", "10", "--exclude-path-regex", GENERATING)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def test_the_generating_operations_reject_every_invalid_request_with_a_documented_4xx(server):
    options = ["--max-examples", "8", "--mode", "negative", "--include-path-regex", GENERATING]
    run = schemathesis(server, *options, excluded=f"{EXCLUDED},positive_data_acceptance")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
