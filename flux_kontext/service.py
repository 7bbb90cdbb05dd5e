"""HTTP layer: create_app(settings, engine_factory) -> FastAPI. Routes stay thin; no torch here."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from flux_kontext import bytecode_cache
from flux_kontext.auth import ApiKeyMiddleware
from flux_kontext.benchmark import BenchmarkParams, run_benchmark
from flux_kontext.cors import add_cors
from flux_kontext.docs_pages import DocsImagePolicy, app_with_local_docs
from flux_kontext.errors import CLIENT_CLOSED_REQUEST, ServiceError, install_error_handlers
from flux_kontext.image_encoding import ImageEncoder
from flux_kontext.inference import image_response, image_wanted, raw_image_request, run_inference
from flux_kontext.jobs import EngineNotReady, EngineOutOfMemory, Job, JobRejected, JobResult
from flux_kontext.metrics import GENERATION_MODE, Metrics
from flux_kontext.playground import add_playground
from flux_kontext.queue import JobQueue, QueueFull, ShuttingDown, WorkerStopped
from flux_kontext.request_body import RequestBodyMiddleware
from flux_kontext.request_forms import INFERENCE_BODY, read_inference_request
from flux_kontext.request_id import request_id_middleware
from flux_kontext.schedulers import SCHEDULERS
from flux_kontext.schemas import (
    MAX_SIDE,
    MIN_SIDE,
    ErrorEnvelope,
    InferenceResponse,
)
from flux_kontext.settings import Settings
from utils import MEDIA_TYPES

log = logging.getLogger(__name__)
ERRORS = {status: {"model": ErrorEnvelope} for status in (400, 409, 413, 415, 422, 429, 503, 504)}
STOP_WAIT_S = 5.0  # after the drain timeout: how long the running job gets to reach its next step and stop
STATES = "starting | loading | warming_up | ready | failed | draining"


def not_ready_doc(example: dict) -> dict:
    """The 503 of a health route, for the OpenAPI document."""
    description = f"Not ready: the state ({STATES}) and why; Retry-After on the routes that do work."
    return {503: {"description": description, "content": {"application/json": {"example": example}}}}


HEALTH_503 = not_ready_doc(
    {"status": "loading", "state": "loading", "reason": "loading model 'black-forest-labs/FLUX.1-Kontext-dev'"}
)
READY_503 = not_ready_doc({"ready": False, "state": "draining", "reason": "the server is shutting down"})


def default_engine_factory(settings: Settings):
    from flux_kontext.parallel.launch import engine_for  # torch is imported there, not by the HTTP layer

    return engine_for(settings)  # the plain Engine, or rank 0's of a parallel service (FLUX_PARALLEL, torchrun)


class Service:
    """State shared by the routes: settings, engine, queue, metrics."""

    def __init__(self, settings: Settings, engine):
        self.settings = settings
        self.engine = engine
        self.queue = JobQueue(engine.generate, settings.max_queue, settings.job_stop_grace_s)
        self.encoder = ImageEncoder.from_settings(settings)  # responses' images, in the encoding phase
        memory = getattr(engine, "memory_bytes", lambda: None)
        self.metrics = Metrics(lambda: self.queue.depth, self._graph_evictions, memory)
        self.benchmark_lock = asyncio.Lock()
        self.draining = False  # set by drain(): readiness 503, new jobs refused, those accepted finish
        self._drained: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._answering: set[asyncio.Task] = set()  # detached work (async jobs) a drain waits for past the GPU

    def answer_in_background(self, task: asyncio.Task) -> None:
        """A task that answers an accepted job with no HTTP connection held open (an async job: its GPU work, its
        encoding and its record; its webhook's delivery, retries included). A drain waits for it, not only for the
        GPU queue, so no accepted job is left 'running' in a record nobody will finish, and no finished job's
        webhook is cut off by the shutdown (within the drain's time)."""
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _until_answered(self, timeout_s: float) -> None:
        """Until the queue is idle and every detached answer is written, at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        await self.queue.until_idle(timeout_s)
        while self._answering and time.monotonic() < deadline:  # a finished job may start its webhook's delivery
            await asyncio.wait(set(self._answering), timeout=deadline - time.monotonic())

    def _graph_evictions(self) -> int:
        reports = getattr(self.engine, "reports", [])
        return next((r.data.get("evictions", 0) for r in reports if r.name == "cuda_graphs"), 0)

    @property
    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.draining and self.worker_problem is None

    @property
    def worker_problem(self) -> tuple[str, str] | None:
        """(state, reason) when the GPU worker is dead or stuck (queue.py's watchdog); None when it is fine."""
        if self.queue.failure:
            return "worker_stopped", self.queue.failure
        stuck = self.queue.stuck
        return ("worker_stuck", stuck) if stuck else None

    @property
    def alive(self) -> bool:
        """False once the process needs a restart: the worker died, or has been stuck FLUX_STUCK_RESTART_S, or a
        parallel service's ranks are out of step (a rank died or hung: flux_kontext/parallel/)."""
        limit = self.settings.stuck_restart_s
        if getattr(self.engine, "broken", None):
            return False
        return not self.queue.failure and not (limit and self.queue.stuck_seconds() > limit)

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        problem = self.worker_problem
        return problem[0] if problem and self.engine.ready else self.engine.state

    @property
    def reason(self) -> str | None:
        if self.draining:
            return "the server is shutting down"
        problem = self.worker_problem
        return problem[1] if problem and self.engine.ready else self.engine.reason

    def require_ready(self) -> None:
        if self.draining:
            raise ServiceError(
                503,
                "shutting_down",
                f"the server is shutting down; retry in {self.settings.retry_after_s} s (another instance serves it)",
                headers=self.retry_after,
            )
        problem = self.worker_problem
        if problem is not None:
            raise ServiceError(503, "not_ready", problem[1], headers=self.retry_after)
        if not self.engine.ready:
            raise ServiceError(
                503, "not_ready", f"model is {self.engine.state}: {self.engine.reason}", headers=self.retry_after
            )

    def require_memory(self, job: Job) -> None:
        """422 before queueing a job the memory plan cannot hold (num_images above its limit at that size)."""
        refusal = self.engine.memory_refusal(job)
        if refusal is not None:
            raise ServiceError(422, "exceeds_memory_plan", refusal, param="num_images")

    def require_room(self) -> None:
        """429 before any work (image decoding included) when the queue is full."""
        if not self.queue.has_room():
            raise ServiceError(
                429,
                "overloaded",
                f"server is busy: {self.queue.depth} jobs queued or running; retry later",
                headers=self.retry_after,
            )

    async def submit(self, job: Job) -> tuple[JobResult, float]:
        """Run a job through the bounded queue, mapping engine failures to HTTP errors."""
        self.require_ready()
        self.require_memory(job)
        retry = self.retry_after
        try:
            self.engine.check(job)
            return await self.queue.submit(job, self.settings.request_timeout_s)
        except QueueFull as exc:
            raise ServiceError(429, "overloaded", f"server is busy: {exc}; retry later", headers=retry) from None
        except EngineOutOfMemory as exc:
            raise ServiceError(503, "out_of_memory", str(exc), headers=retry) from None
        except (EngineNotReady, WorkerStopped) as exc:
            raise ServiceError(503, "not_ready", str(exc), headers=retry) from None
        except ShuttingDown as exc:
            raise ServiceError(503, "shutting_down", str(exc), headers=retry) from None
        except asyncio.TimeoutError:
            raise ServiceError(
                504,
                "timeout",
                f"no result within {self.settings.request_timeout_s:g} s (FLUX_REQUEST_TIMEOUT_S); the job was stopped",
            ) from None
        except JobRejected as exc:
            raise ServiceError(422, "invalid_request", str(exc)) from None

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop admitting jobs (readiness 503, new requests 503) and let the accepted ones finish within
        ``timeout_s`` (FLUX_DRAIN_TIMEOUT_S); then the waiting ones are answered 503 "not run" and the running one
        503 "stopped" (it stops at its next step). Idempotent: a second call waits for the first."""
        if self._drained is not None:
            self.hurry()
            await self._drained.wait()
            return
        self.draining = True
        self._drained, self._hurry = asyncio.Event(), asyncio.Event()
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        log.warning("draining: %d job(s) queued or running; up to %.3g s to finish", self.queue.depth, timeout_s)
        try:
            idle = asyncio.ensure_future(self._until_answered(timeout_s))
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait({idle, hurry}, return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            idle.cancel()
            if self.queue.depth:
                limit = f"FLUX_DRAIN_TIMEOUT_S={timeout_s:g} s"
                answered = self.queue.abort(
                    f"the server is shutting down: the job was not run (still queued after {limit}); retry elsewhere",
                    f"the server is shutting down: the job was stopped before it finished ({limit}); retry elsewhere",
                )
                log.warning("drain: %d job(s) answered 503 after %.1f s", answered, time.monotonic() - start)
            await self._until_answered(STOP_WAIT_S)  # the stopped job, answers still encoding; at once when none
            log.warning("drained in %.1f s", time.monotonic() - start)
        finally:
            self._drained.set()

    def hurry(self) -> None:
        """End a drain in progress now (a second signal): what has not finished is answered 503 at once."""
        if self._hurry is not None:
            self._hurry.set()

    def health(self) -> dict:
        engine = self.engine
        return {
            "status": "ok" if self.ready else self.state,
            "state": self.state,
            "reason": self.reason,
            "demo": engine.model.demo if engine.model else None,
            "model": engine.describe_model(),
            "device": engine.describe_device(),
            "optimizations": [report.public() for report in engine.reports],
            "memory_plan": engine.describe_memory(),
            "queue": {"depth": self.queue.depth, "max_waiting": self.queue.max_waiting},
            "load_seconds": round(engine.load_seconds, 2) if engine.load_seconds else None,
            "warmup_seconds": round(engine.warmup_seconds, 2) if engine.warmup_seconds else None,
            "startup_seconds": {k: None if v is None else round(v, 2) for k, v in engine.startup_seconds.items()},
            "startup_bytecode": bytecode_cache.state(),
            "startup_decisions": engine.describe_decisions() if hasattr(engine, "describe_decisions") else None,
            "shapes": engine.shapes_report(),
            "parallel": self.describe_parallel(),
            "encoding": self.encoder.describe(),
        }

    def describe_parallel(self) -> dict:
        """The ranks of a parallel service (flux_kontext/parallel/), or a world of one."""
        describe = getattr(self.engine, "describe_parallel", None)
        return describe() if describe is not None else {"world_size": 1}


class RequestMetrics:
    """ASGI middleware counting every response by route template and status (the 500s of escaped exceptions too,
    and 499 for a client that left before its response: during its body, or while its job ran), with its latency,
    and generation requests by mode (see metrics.py for why not a library)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = CLIENT_CLOSED_REQUEST  # no response at all: the client went away (or the request was cancelled)
        start = time.perf_counter()

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        except Exception:
            status = 500  # an exception escaping the app becomes a 500 further out
            raise
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            seconds = time.perf_counter() - start
            self.metrics.observe_http(endpoint, scope["method"], status, seconds, scope.get(GENERATION_MODE))


def refuse_several_workers() -> None:
    """One GPU, one process: the queue, the model and async jobs live in this process's memory."""
    workers = os.environ.get("WEB_CONCURRENCY", "1").strip() or "1"
    if workers != "1":
        raise RuntimeError(
            f"WEB_CONCURRENCY={workers}: this service runs one worker process per GPU (the model, the queue and the "
            "async jobs are in its memory); run one process per GPU, behind a load balancer"
        )


def create_app(settings: Settings | None = None, engine_factory: Callable[[Settings], object] | None = None) -> FastAPI:
    """Build the app. The model loads in a background thread at startup; /health is 503 until ready."""
    settings = settings or Settings()
    engine = (engine_factory or default_engine_factory)(settings)
    service = Service(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        refuse_several_workers()
        service.queue.start()
        if engine.state == "starting":  # not loaded yet (a Ray Serve replica loads in its constructor, before this)
            threading.Thread(target=engine.load, name="model-loader", daemon=True).start()
        try:
            yield
            # `serve` drained already (a no-op then); under plain uvicorn this is the best effort left: the listener
            # is closed, the HTTP requests are done, async jobs still queued get FLUX_DRAIN_TIMEOUT_S, then a 503.
            await service.drain()
        finally:
            await service.queue.stop()
            close = getattr(engine, "close", None)  # a parallel service's other ranks stop with this one
            if close is not None:
                await asyncio.to_thread(close)

    app = app_with_local_docs(title="FLUX.1-Kontext optimized", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    from flux_kontext.protocols import async_jobs, openai_images  # routers over this Service (no cycle at import)

    # Innermost first (Starlette wraps each added middleware around the ones before): POST /inference with
    # Prefer: respond-async becomes POST /v1/jobs (metrics count it under that route); then the body (limit, bytes
    # in flight, disconnect watch); count every response (413s included); outermost, the request id (every
    # response, error body and log line of the request carries it).
    app.add_middleware(async_jobs.RespondAsyncMiddleware)
    app.add_middleware(DocsImagePolicy)
    app.add_middleware(
        RequestBodyMiddleware,
        max_bytes=settings.max_body_bytes,
        max_bytes_in_flight=settings.max_body_bytes_in_flight,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(ApiKeyMiddleware, settings=settings)  # before the body is read: no key, no bytes buffered
    add_cors(app, settings.cors_origins)  # outside the key check: preflights carry no key, a 401 is readable
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    request_ids, request_id_options = request_id_middleware()
    app.add_middleware(request_ids, **request_id_options)

    app.include_router(openai_images.build_router(service))
    app.include_router(async_jobs.build_router(service))
    if settings.playground:
        add_playground(app)

    raw_image = {
        "description": "Accept: image/png|jpeg|webp: the image itself",
        "content": {m: {} for m in MEDIA_TYPES.values()},
    }

    @app.post(
        "/inference",
        response_model=InferenceResponse,
        responses={**ERRORS, 200: raw_image, 406: {"model": ErrorEnvelope}},
        openapi_extra=INFERENCE_BODY,
    )
    async def inference(http_request: Request):
        """Edit an image (``image`` given) or generate one from text. JSON, or multipart/form-data with the image
        as a file part."""
        request = await read_inference_request(http_request, settings)
        wanted = image_wanted(http_request.headers.get("accept", ""))
        if wanted is None:
            return JSONResponse(await run_inference(service, request, http_request))
        request = raw_image_request(request, wanted)
        body = await run_inference(service, request, http_request)
        return image_response(body)

    @app.get("/benchmark", responses=ERRORS)
    async def benchmark(
        runs: int = Query(3, ge=1, le=settings.benchmark_max_runs, description="Timed runs after one warm-up."),
        width: int = Query(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16),
        height: int = Query(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16),
        steps: int | None = Query(None, ge=1, le=50, description="Default: the scheduler's default."),
        mode: Literal["edit", "text_to_image"] = Query("edit"),
        scheduler: Literal[SCHEDULERS] | None = Query(None, description="Default: the server's default."),
    ):
        """Timed generations on the live model, through the same queue as /inference."""
        service.require_ready()
        if service.benchmark_lock.locked():
            raise ServiceError(409, "benchmark_running", "a benchmark is already running; try again when it ends")
        async with service.benchmark_lock:
            params = BenchmarkParams(runs=runs, width=width, height=height, steps=steps, mode=mode, scheduler=scheduler)
            return await run_benchmark(engine, params, service.submit)

    @app.get("/health", responses=HEALTH_503)
    async def health():
        """200 when ready to serve; 503 while loading, warming up or failed (with the reason)."""
        return JSONResponse(service.health(), status_code=200 if service.ready else 503)

    @app.get("/health/live")
    async def live():
        """Liveness: the process and its event loop answer; 503 once it needs a restart (its GPU worker died, or
        has been stuck for FLUX_STUCK_RESTART_S), with the reason."""
        if not service.alive:
            return JSONResponse({"status": "restart_needed", "reason": service.reason}, status_code=503)
        return {"status": "alive"}

    @app.get("/health/ready", responses=READY_503)
    async def ready():
        """Readiness: 200 only when the model is loaded and warmed up, and the server is not shutting down (503
        with state "draining" from the signal on)."""
        body = {"ready": service.ready, "state": service.state, "reason": service.reason}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        """Prometheus text format."""
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
