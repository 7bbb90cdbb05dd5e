"""The service on Ray Serve: one replica per GPU, each the whole single-process app (same engine, routes, errors).

    serve run deploy/ray/serve_config.yaml                   # a local cluster, in the foreground
    serve deploy deploy/ray/serve_config.yaml                # onto a running cluster (`ray start --head` first)

Each replica is ``create_app`` over its own ``Engine``: the constructor loads and warms up the model, and
``check_health`` raises until the engine is ready (Ray routes to a replica only after its first health check
passes). Ray does the queueing across replicas: a replica takes at most ``max_ongoing_requests`` HTTP requests,
the rest wait at the proxy, at most ``max_queued_requests`` of them; beyond that the proxy answers 429 with
``Retry-After`` (``backpressure_config``; Ray's default would be a 503 without it). On scale-down Ray stops routing
to the replica, waits up to ``graceful_shutdown_timeout_s`` for its requests to finish, then the app's shutdown
drains what is left (async jobs still queued get FLUX_DRAIN_TIMEOUT_S).

Ray is an optional dependency (requirements-ray.txt): only this module imports it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from flux_kontext.logging_setup import configure_logging
from flux_kontext.service import create_app
from flux_kontext.settings import Settings

log = logging.getLogger(__name__)
DEPLOYMENT = "FluxKontext"


class RayAppArgs(BaseModel):
    """The application's ``args`` in the Serve config file. Ray's own options (replicas, autoscaling, limits,
    drain) go in its ``deployments:`` section; FLUX_* settings in ``runtime_env.env_vars`` or in ``settings``."""

    model_config = ConfigDict(extra="forbid")

    gpus_per_replica: Literal["auto"] | float = Field(
        "auto",
        description="GPUs each replica reserves: 'auto' is 1 when the cluster has GPUs, else 0 (a CPU replica "
        "reserves one CPU instead, so each replica's torch runs one thread).",
    )
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs each replica reserves (its torch threads).")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings fields (lower-case names, e.g. {'model': 'tiny'}) over the FLUX_* environment.",
    )


@serve.deployment(
    name=DEPLOYMENT,
    max_ongoing_requests=2,  # one generating, one ready to start: the GPU never waits for the next request
    max_queued_requests=32,
    backpressure_config={"status_code": 429, "retry_after_s": 5},
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1.5},
    graceful_shutdown_wait_loop_s=2.0,
    graceful_shutdown_timeout_s=60.0,
    health_check_period_s=5.0,
    max_constructor_retry_count=3,
)
@serve.ingress()
class FluxKontextReplica:
    """One engine and its HTTP app; the constructor returns once the model is loaded and warmed up."""

    async def __init__(self, settings: dict[str, Any] | None = None):
        configure_logging()
        self._app = create_app(Settings(**(settings or {})))
        self._service = self._app.state.service
        engine = self._service.engine
        await asyncio.to_thread(engine.load)  # never raises: a failure is in engine.state / engine.reason
        if not engine.ready:
            raise RuntimeError(f"the engine did not start: {engine.state}: {engine.reason}")

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Ray's health check: raises (the replica gets no traffic, then is replaced) unless the app is ready."""
        service = self._service
        if not service.ready or service.queue.failure:
            raise RuntimeError(f"not ready: {service.state}: {service.queue.failure or service.reason}")


def deployment_options(args: RayAppArgs, cluster_gpus: float) -> dict[str, Any]:
    """Per-replica resources and the Retry-After of Ray's backpressure from our settings. The decorator's other
    options stay, and a ``deployments:`` entry in the Serve config overrides any of them."""
    settings = Settings(**args.settings)
    gpus = args.gpus_per_replica if args.gpus_per_replica != "auto" else (1.0 if cluster_gpus > 0 else 0.0)
    return {
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": args.cpus_per_replica},
        "backpressure_config": {"status_code": 429, "retry_after_s": settings.retry_after_s},
    }


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application builder (``import_path: flux_kontext.ray_serve:build_app``). Serve runs it on the
    cluster, so 'auto' GPUs read the cluster's resources; Ray gives each GPU replica its own CUDA_VISIBLE_DEVICES,
    so FLUX_DEVICE=auto is that replica's GPU."""
    import ray

    parsed = RayAppArgs(**(args or {}))
    cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    options = deployment_options(parsed, cluster_gpus)
    log.info("Ray Serve app: %s per replica", options["ray_actor_options"])
    return FluxKontextReplica.options(**options).bind(parsed.settings)


def fixed_replicas(args: RayAppArgs, replicas: int, **options) -> Application:
    """``replicas`` replicas, no autoscaling, on CPUs: what the tests and bench/ray_throughput.py deploy."""
    scaling = {"min_replicas": replicas, "max_replicas": replicas, "initial_replicas": replicas}
    merged = {**deployment_options(args, cluster_gpus=0.0), "autoscaling_config": scaling, **options}
    return FluxKontextReplica.options(**merged).bind(args.settings)
