"""The service on Ray Serve (flux_kontext/ray_serve.py): a local Ray cluster of 2 CPUs, two replicas of the tiny model.

Every test goes through Ray's HTTP proxy, as clients do. Skipped only where Ray is not installed
(`./setup_flux_optimized.sh --dev --ray` installs it; CI does).
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import decode_b64_image
from tests.live_server import ROOT, free_port

ray = pytest.importorskip("ray", reason="Ray is optional: ./setup_flux_optimized.sh --dev --ray installs it")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (requirements-ray.txt)")

from flux_kontext.ray_serve import DEPLOYMENT, RayAppArgs, fixed_replicas  # noqa: E402

APP = "flux"
REPLICAS = 2
MAX_ONGOING = 2  # per replica
MAX_QUEUED = 24  # at the proxy: 2 x 2 + 24 = 28 admitted at once (20 with room to spare)
RETRY_AFTER_S = 3
CONFIG = ROOT / "deploy" / "ray" / "serve_config.yaml"


def request(i: int, steps: int = 2) -> dict:
    """Request i: its own prompt and seed, so each response can be matched to the request it answers."""
    return {"prompt": f"request {i}: a red square", "seed": 1000 + i, "width": 256, "height": 256, "steps": steps}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_b64_image(b64), dtype=np.float32)


@pytest.fixture(scope="module")
def ray_app():
    """Ray on 2 CPUs (one per replica: each replica's torch runs one thread), two fixed replicas of the tiny model."""
    ray.init(
        num_cpus=REPLICAS,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},  # the replicas import flux_kontext from this checkout
    )
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(REPLICAS)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(replicas: int) -> None:
    """The app with ``replicas`` replicas (a new count updates it in place: no replica restarts)."""
    args = RayAppArgs(settings={"model": "tiny", "retry_after_s": RETRY_AFTER_S})
    limits = {"max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_QUEUED}
    serve.run(fixed_replicas(args, replicas, **limits, graceful_shutdown_timeout_s=60), name=APP, route_prefix="/")


def running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def replica_actor_names() -> list[str]:
    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in actors if a["name"].startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"))


def burst(base: str, bodies: list[dict], during=None) -> list[httpx.Response | Exception]:
    """POST every body to /inference at once; ``during()`` runs while they are out. Returns responses (or the
    transport error) in the order of ``bodies``."""

    def post(body):
        try:
            return httpx.post(f"{base}/inference", json=body, timeout=120)
        except httpx.HTTPError as exc:
            return exc

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(post, body) for body in bodies]
        if during is not None:
            during(futures)
        return [f.result() for f in futures]


def assert_answers(response: httpx.Response, body: dict, reference: dict[int, np.ndarray] | None = None) -> None:
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["prompt"] == body["prompt"]
    assert [image["seed"] for image in data["images"]] == [body["seed"]]
    if reference is not None:
        got = pixels(data["images"][0]["image"])
        distances = {seed: float(np.abs(got - ref).mean()) for seed, ref in reference.items()}
        assert min(distances, key=distances.get) == body["seed"], distances  # its own image, no other's
        assert distances[body["seed"]] < 1.0, distances  # the same image (up to float rounding across thread counts)


def test_the_serve_config_file_is_valid_for_ray_and_names_the_deployment():
    import yaml  # a dependency of ray
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "flux_kontext.ray_serve:build_app"
    RayAppArgs(**app.args)  # the builder accepts its args
    (deployment,) = app.deployments
    assert deployment.name == DEPLOYMENT
    assert deployment.autoscaling_config["min_replicas"] >= 1
    assert deployment.backpressure_config.status_code == 429  # not Ray's default 503
    # Ray's Retry-After is the replicas' own (their 429 and 503 envelopes).
    assert deployment.backpressure_config.retry_after_s == int(app.runtime_env["env_vars"]["FLUX_RETRY_AFTER_S"])


def test_two_replicas_serve_20_concurrent_requests_each_answered_with_its_own_image(ray_app, client):
    assert running_replicas() == REPLICAS
    health = httpx.get(f"{ray_app}/health", timeout=30)
    assert health.status_code == 200 and health.json()["state"] == "ready"
    bodies = [request(i) for i in range(20)]
    # The single-process service (tests/conftest.py) gives each request's expected image.
    reference = {b["seed"]: pixels(client.post("/inference", json=b).json()["images"][0]["image"]) for b in bodies}
    responses = burst(ray_app, bodies)
    for response, body in zip(responses, bodies, strict=True):
        assert_answers(response, body, reference)


def test_the_openai_routes_and_raw_images_go_through_the_proxy(ray_app):
    generated = httpx.post(
        f"{ray_app}/v1/images/generations", json={"prompt": "a lighthouse", "size": "256x256", "seed": 5}, timeout=60
    )
    assert generated.status_code == 200, generated.text
    assert generated.json()["seeds"] == [5]
    assert httpx.get(f"{ray_app}/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"
    raw = httpx.post(f"{ray_app}/inference", json=request(1), headers={"Accept": "image/png"}, timeout=60)
    assert raw.status_code == 200 and raw.headers["X-Seed"] == "1001"
    assert Image.open(io.BytesIO(raw.content)).size == (256, 256)
    edit = httpx.post(f"{ray_app}/inference", json={**request(2), "image": "not base64!"}, timeout=30)
    assert edit.status_code == 400 and edit.json()["error"]["type"] == "invalid_base64"  # our envelope


def test_past_the_queue_limits_requests_get_429_with_retry_after_and_the_admitted_ones_their_image(ray_app):
    admitted = REPLICAS * MAX_ONGOING + MAX_QUEUED
    # 512² with 8 steps: the admitted ones take seconds, so the rest arrive while the queue is still full.
    bodies = [{**request(i, steps=8), "width": 512, "height": 512} for i in range(admitted + 20)]
    responses = burst(ray_app, bodies)
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, [r.status_code for r in responses]
    for response in rejected:
        assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert "backpressure" in response.text  # Ray's proxy says why (its text; see README: Ray Serve)
    for response, body in zip(responses, bodies, strict=True):
        if response.status_code != 429:
            assert_answers(response, body)
    assert len(responses) - len(rejected) >= admitted


def test_a_replica_killed_mid_burst_loses_only_its_in_flight_requests_and_the_app_recovers(ray_app):
    victims = replica_actor_names()
    assert len(victims) == REPLICAS
    bodies = [request(100 + i, steps=12) for i in range(16)]
    killed: list[str] = []

    def kill_one_replica_once_work_is_done_and_queued(futures):
        deadline = time.monotonic() + 60
        while not any(f.done() for f in futures):  # both replicas busy, the rest queued at the proxy
            assert time.monotonic() < deadline, "no request finished"
            time.sleep(0.01)
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        killed.append(victims[0])

    responses = burst(ray_app, bodies, during=kill_one_replica_once_work_is_done_and_queued)
    assert killed
    lost = [i for i, r in enumerate(responses) if isinstance(r, Exception) or r.status_code != 200]
    # Only what the killed replica had accepted (at most max_ongoing_requests) fails: Ray's proxy answers those 500
    # (its text); the client may retry them (same seed, same image). Everything waiting at the proxy is served.
    assert len(lost) <= MAX_ONGOING, [getattr(responses[i], "status_code", responses[i]) for i in lost]
    for i, (body, response) in enumerate(zip(bodies, responses, strict=True)):
        if i in lost:
            assert isinstance(response, httpx.HTTPError) or response.status_code == 500, response
            response = httpx.post(f"{ray_app}/inference", json=body, timeout=120)  # the retry is answered
        assert_answers(response, body)

    # Ray's controller replaces the dead replica: two running again, the new one under another name.
    deadline = time.monotonic() + 120
    while running_replicas() != REPLICAS or len(set(replica_actor_names()) - {killed[0]}) != REPLICAS:
        assert time.monotonic() < deadline, (serve.status(), replica_actor_names())
        time.sleep(0.5)
    assert_answers(httpx.post(f"{ray_app}/inference", json=request(7), timeout=60), request(7))


def test_a_redeploy_mid_burst_drains_the_replicas_it_stops_and_every_request_is_answered(ray_app):
    """The graceful stop of scale-down and of updates: routing stops, the replica finishes what it holds
    (graceful_shutdown_timeout_s), then the app's own drain. Here both old replicas stop while they hold requests (a
    deploy from Python is a new code version: a replacement, down to one replica)."""
    before = set(replica_actor_names())
    assert len(before) == REPLICAS
    bodies = [request(200 + i, steps=12) for i in range(REPLICAS * MAX_ONGOING + 4)]

    def redeploy_with_one_replica_once_work_is_done_and_queued(futures):
        deadline = time.monotonic() + 60
        while not any(f.done() for f in futures):
            assert time.monotonic() < deadline, "no request finished"
            time.sleep(0.01)
        deploy(1)

    responses = burst(ray_app, bodies, during=redeploy_with_one_replica_once_work_is_done_and_queued)
    for response, body in zip(responses, bodies, strict=True):
        assert_answers(response, body)  # none lost: neither those the stopped replicas held nor those waiting
    deadline = time.monotonic() + 60
    while len(replica_actor_names()) != 1:
        assert time.monotonic() < deadline, (serve.status(), replica_actor_names())
        time.sleep(0.5)
    assert not set(replica_actor_names()) & before


def test_a_replica_whose_engine_cannot_start_gets_no_traffic_and_the_deploy_says_why(ray_app):
    args = RayAppArgs(settings={"model": "tiny", "device": "cuda"})  # no CUDA here: the engine fails at load
    broken = fixed_replicas(args, 1, max_constructor_retry_count=1)
    with pytest.raises(RuntimeError, match="Deploying application broken failed"):
        serve.run(broken, name="broken", route_prefix="/broken")
    status = serve.status().applications["broken"]
    assert status.status == "DEPLOY_FAILED"
    assert "no CUDA device is available" in status.deployments[DEPLOYMENT].message  # `serve status` says why
    assert not status.deployments[DEPLOYMENT].replica_states.get("RUNNING")
    serve.delete("broken")
    assert_answers(httpx.post(f"{ray_app}/inference", json=request(8), timeout=60), request(8))  # the other app serves
