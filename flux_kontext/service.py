"""HTTP layer: create_app(settings, engine_factory) -> FastAPI. Routes stay thin; no torch here."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from flux_kontext.auth import ApiKeyMiddleware
from flux_kontext.benchmark import BenchmarkParams, run_benchmark
from flux_kontext.errors import ServiceError, install_error_handlers
from flux_kontext.jobs import EngineNotReady, EngineOutOfMemory, Job, JobRejected, JobResult
from flux_kontext.metrics import Metrics
from flux_kontext.queue import JobQueue, QueueFull, ShuttingDown, WorkerStopped
from flux_kontext.request_body import DISCONNECTED, RequestBodyMiddleware
from flux_kontext.request_forms import INFERENCE_BODY, read_inference_request
from flux_kontext.schedulers import SCHEDULERS
from flux_kontext.schemas import (
    MATCH_INPUT_IMAGE,
    MAX_SIDE,
    MIN_SIDE,
    ErrorEnvelope,
    GeneratedImage,
    InferenceRequest,
    InferenceResponse,
)
from flux_kontext.settings import Settings
from utils import MEDIA_TYPES, ImageInputError, decode_image, encode_image, new_seed

log = logging.getLogger(__name__)
ERRORS = {status: {"model": ErrorEnvelope} for status in (400, 409, 413, 415, 422, 429, 503, 504)}
STOP_WAIT_S = 5.0  # after the drain timeout: how long the running job gets to reach its next step and stop


def default_engine_factory(settings: Settings):
    from flux_kontext.engine import Engine  # torch is imported here, not by the HTTP layer

    return Engine(settings)


class Service:
    """State shared by the routes: settings, engine, queue, metrics."""

    def __init__(self, settings: Settings, engine):
        self.settings = settings
        self.engine = engine
        self.queue = JobQueue(engine.generate, settings.max_queue)
        self.metrics = Metrics(lambda: self.queue.depth, self._graph_evictions)
        self.benchmark_lock = asyncio.Lock()
        self.draining = False  # set by drain(): readiness 503, new jobs refused, those accepted finish
        self._drained: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None

    def _graph_evictions(self) -> int:
        reports = getattr(self.engine, "reports", [])
        return next((r.data.get("evictions", 0) for r in reports if r.name == "cuda_graphs"), 0)

    @property
    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.draining

    @property
    def state(self) -> str:
        return "draining" if self.draining else self.engine.state

    @property
    def reason(self) -> str | None:
        return "the server is shutting down" if self.draining else self.engine.reason

    def require_ready(self) -> None:
        if self.draining:
            raise ServiceError(
                503,
                "shutting_down",
                f"the server is shutting down; retry in {self.settings.retry_after_s} s (another instance serves it)",
                headers=self.retry_after,
            )
        if self.queue.failure:
            raise ServiceError(503, "not_ready", self.queue.failure, headers=self.retry_after)
        if not self.engine.ready:
            raise ServiceError(
                503, "not_ready", f"model is {self.engine.state}: {self.engine.reason}", headers=self.retry_after
            )

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
        retry = self.retry_after
        try:
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
            idle = asyncio.ensure_future(self.queue.until_idle(timeout_s))
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
                await self.queue.until_idle(STOP_WAIT_S)
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
            "queue": {"depth": self.queue.depth, "max_waiting": self.queue.max_waiting},
            "load_seconds": round(engine.load_seconds, 2) if engine.load_seconds else None,
            "warmup_seconds": round(engine.warmup_seconds, 2) if engine.warmup_seconds else None,
            "startup_seconds": {k: None if v is None else round(v, 2) for k, v in engine.startup_seconds.items()},
        }


def to_job(request: InferenceRequest, settings: Settings) -> Job:
    """Convert a validated request into an engine job; decodes the image (call off the event loop)."""
    try:
        image = decode_image(request.image, settings.max_input_pixels) if request.image is not None else None
    except ImageInputError as exc:
        raise ServiceError(exc.status, exc.code, exc.message, param="image") from None
    width, height = request.output_size()
    return Job(
        prompt=request.prompt,
        seed=request.seed if request.seed is not None else new_seed(),
        image=image,
        width=width,
        height=height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        true_cfg_scale=request.true_cfg_scale,
        negative_prompt=request.negative_prompt,
        num_images=request.num_images,
        scheduler=request.scheduler,
        cache_threshold=request.cache_threshold,
        flags=request.flags(),
    )


def to_response(request: InferenceRequest, job: Job, result: JobResult, wait_ms: float, model: dict) -> dict:
    """Build the response body; encodes images (call off the event loop), timed as the ``encoding`` phase."""
    encoding_start = time.perf_counter()
    images = [
        GeneratedImage(
            image=encode_image(img, request.output_format, request.encoder_quality),
            seed=seed,
            width=img.width,
            height=img.height,
            format=request.output_format,
        )
        for img, seed in zip(result.images, result.seeds, strict=True)
    ]
    encoding_ms = round((time.perf_counter() - encoding_start) * 1000.0, 2)
    snapped_ratio = request.aspect_ratio not in (None, MATCH_INPUT_IMAGE)
    return InferenceResponse(
        id=f"req-{uuid.uuid4().hex[:16]}",
        mode="edit" if job.image is not None else "text_to_image",
        prompt=request.prompt,
        images=images,
        size_source="aspect_ratio_snapped" if snapped_ratio else result.size_source,
        context_size=list(result.context_size) if result.context_size else None,
        steps=result.steps,
        scheduler=result.scheduler,
        guidance_scale=request.guidance_scale,
        true_cfg_scale=request.true_cfg_scale,
        true_cfg_active=result.true_cfg,
        first_block_cache=result.first_block_cache,
        cuda_graphs=result.cuda_graphs,
        timings_ms={"queue_wait": round(wait_ms, 2), **result.timings_ms, "encoding": encoding_ms},
        warnings=result.warnings,
        model=model,
        optimizations=result.optimizations,
    ).model_dump()


async def run_inference(service: Service, request: InferenceRequest, http_request: Request) -> dict:
    """One validated request through the queue, as /inference and the OpenAI routes run it: 503 / 429 before any
    work, the image decoded and the result encoded off the event loop, the job cancelled if the client leaves.
    Returns the /inference response body (total time and metrics recorded)."""
    service.require_ready()
    service.require_room()
    start = time.perf_counter()
    job = await asyncio.to_thread(to_job, request, service.settings)
    result, wait_ms = await until_disconnect(http_request, service.submit(job))
    model = service.engine.describe_model()
    body = await asyncio.to_thread(to_response, request, job, result, wait_ms, model)
    body["timings_ms"]["total"] = round((time.perf_counter() - start) * 1000.0, 2)
    service.metrics.observe_timings(body["timings_ms"])
    service.metrics.images.inc(len(body["images"]))
    return body


# ----- Accept: image/* on /inference: the image itself, so `curl -o out.png` works ----------------------------------
def image_wanted(accept: str) -> str | None:
    """The output format the Accept header asks for first, if it is an image type we make (else JSON)."""
    for part in accept.split(","):
        kind = part.split(";")[0].strip().lower()
        if kind in ("application/json", "*/*", "application/*"):
            return None
        fmt = next((fmt for fmt, media in MEDIA_TYPES.items() if media == kind), None)
        if fmt is not None:
            return fmt
    return None


def raw_image_request(request: InferenceRequest, fmt: str) -> InferenceRequest:
    """The request answered with one image's bytes: its format is the one accepted, and one image only."""
    if "output_format" in request.model_fields_set and request.output_format != fmt:
        raise ServiceError(406, "not_acceptable", f"Accept asks for {fmt}; output_format is {request.output_format}")
    if request.num_images != 1:
        raise ServiceError(
            406, "not_acceptable", "an image/* response holds one image: send num_images 1, or Accept: application/json"
        )
    return request.model_copy(update={"output_format": fmt})


def image_response(body: dict) -> Response:
    """One image's bytes; what JSON would carry besides it goes into headers (seed, size, timings, what ran)."""
    image = body["images"][0]
    headers = {
        "Content-Disposition": f'inline; filename="{body["id"]}.{image["format"]}"',
        "X-Seed": str(image["seed"]),
        "X-Image-Size": f"{image['width']}x{image['height']}",
        "X-Timings-Total-Ms": str(body["timings_ms"]["total"]),
        "X-Optimizations-Ran": ",".join(body["optimizations"]["ran"]),
    }
    return Response(base64.b64decode(image["image"]), media_type=MEDIA_TYPES[image["format"]], headers=headers)


async def until_disconnect(request: Request, work):
    """Await ``work``; if the client disconnects first, cancel it (the queue then stops the job)."""
    disconnected: asyncio.Event | None = request.scope.get(DISCONNECTED)
    task = asyncio.ensure_future(work)
    if disconnected is None:
        return await task
    gone = asyncio.ensure_future(disconnected.wait())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            log.info("client disconnected; cancelling its job")
            task.cancel()
        return await task
    finally:
        gone.cancel()


class RequestMetrics:
    """ASGI middleware counting every response by route and status, the 500s of escaped exceptions too."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # an exception escaping the app becomes a 500 further out

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


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
        loader = threading.Thread(target=engine.load, name="model-loader", daemon=True)
        loader.start()
        try:
            yield
            # `serve` drained already (a no-op then); under plain uvicorn this is the best effort left: the listener
            # is closed, the HTTP requests are done, async jobs still queued get FLUX_DRAIN_TIMEOUT_S, then a 503.
            await service.drain()
        finally:
            await service.queue.stop()

    app = FastAPI(title="FLUX.1-Kontext optimized", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    from flux_kontext.protocols import async_jobs, openai_images  # routers over this Service (no cycle at import)

    # Innermost first (Starlette wraps each added middleware around the ones before): POST /inference with
    # Prefer: respond-async becomes POST /v1/jobs (metrics count it under that route); then the body (limit,
    # disconnect watch); outermost, count every response (413s included).
    app.add_middleware(async_jobs.RespondAsyncMiddleware)
    app.add_middleware(RequestBodyMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, settings=settings)  # before the body is read: no key, no bytes buffered
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    app.include_router(openai_images.build_router(service))
    app.include_router(async_jobs.build_router(service))

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

    @app.get("/health")
    async def health():
        """200 when ready to serve; 503 while loading, warming up or failed (with the reason)."""
        return JSONResponse(service.health(), status_code=200 if service.ready else 503)

    @app.get("/health/live")
    async def live():
        """Liveness: the process and its event loop answer."""
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready():
        """Readiness: 200 only when the model is loaded and warmed up, and the server is not shutting down (503
        with state "draining" from the signal on)."""
        body = {"ready": service.ready, "state": service.state, "reason": service.reason}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def metrics():
        """Prometheus text format."""
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
