"""Async jobs: submit, poll, cancel, progress events and raw image bytes, over the same queue as /inference.

``POST /v1/jobs`` (or ``POST /inference`` with ``Prefer: respond-async``, through ``RespondAsyncMiddleware``)
answers 202 with a job id once the job is in the queue (429 / 503 exactly as /inference when it cannot be).
The job then runs on its own: a client that disconnects, from the submission or from the event stream, does not
cancel it; only ``DELETE /v1/jobs/{id}`` (or FLUX_REQUEST_TIMEOUT_S) does. Jobs live in this process's memory:
finished ones are kept for FLUX_JOB_RESULT_TTL_S, at most FLUX_MAX_KEPT_JOBS of them and FLUX_MAX_KEPT_JOB_MB
of encoded images (oldest finished evicted first), and all are lost on restart. Jobs not yet finished are
bounded by the queue itself. No torch here.

Webhooks (``webhook_url``, ``webhook_events``: job fields, not /inference fields) are off unless the operator lists
the URL prefixes a job may name (FLUX_WEBHOOK_ALLOWED_PREFIXES): no request can make the server call any other
URL. Each event is POSTed from the event loop (never the GPU worker; a failed delivery never fails the job), signed
the Standard Webhooks way with FLUX_WEBHOOK_SECRET, retried on network errors, 5xx and 429, redirects not followed;
its outcome shows in the job's state under ``webhook``. Deliveries pending at shutdown are lost.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import time
import uuid

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from flux_kontext.errors import ServiceError
from flux_kontext.inference import to_job, to_response
from flux_kontext.jobs import JobCancelled
from flux_kontext.protocols.job_schemas import JobState
from flux_kontext.protocols.job_store import FINISHED, WEBHOOK_EVENTS, JobRecord, JobStore, Webhook
from flux_kontext.protocols.webhooks import Webhooks, read_job_request
from flux_kontext.request_forms import INFERENCE_BODY, form_schema
from flux_kontext.request_id import current_request_id  # the submission's: this task runs in its context
from flux_kontext.schemas import ErrorEnvelope, InferenceRequest
from flux_kontext.service import ERRORS
from utils import MEDIA_TYPES

log = logging.getLogger(__name__)
NOT_FOUND = {404: {"model": ErrorEnvelope}}
CONFLICT = {409: {"model": ErrorEnvelope}}
CLIENT_CLOSED = 499  # a cancelled job's status in the metrics (nginx's "client closed request")


# ----- Prefer (RFC 7240) -------------------------------------------------------------------------------------------
def preferences(header: str | None) -> dict[str, str | None]:
    """``respond-async, wait=10`` -> {"respond-async": None, "wait": "10"} (names lower-cased, parameters dropped)."""
    prefs: dict[str, str | None] = {}
    for item in (header or "").split(","):
        name, _, value = item.split(";")[0].strip().partition("=")
        if name:
            prefs.setdefault(name.strip().lower(), value.strip().strip('"') or None)
    return prefs


def wait_seconds(prefs: dict[str, str | None], limit: float) -> float:
    try:
        return min(max(float(prefs.get("wait") or 0), 0.0), limit)
    except ValueError:
        return 0.0


class RespondAsyncMiddleware:
    """Sends ``POST /inference`` with ``Prefer: respond-async`` to ``POST /v1/jobs``; everything else passes.

    A middleware because the /inference route is matched by path and method only; the job route applies the
    preference and says so (``Preference-Applied``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/inference":
            prefer = dict(scope.get("headers") or []).get(b"prefer", b"").decode("latin-1")
            if "respond-async" in preferences(prefer):
                # In place: the middlewares around this one (metrics) see the route that served it, /v1/jobs.
                scope.update(path="/v1/jobs", raw_path=b"/v1/jobs")
        return await self.app(scope, receive, send)


# ----- the runner ------------------------------------------------------------------------------------------------
class AsyncJobs:
    """Admits jobs into the Service's queue and runs each as its own task, detached from any HTTP connection."""

    def __init__(self, service):
        self.service = service
        s = service.settings
        self.store = JobStore(s.job_result_ttl_s, s.max_kept_jobs, int(s.max_kept_job_mb * 2**20))
        self.webhooks = Webhooks(s, track=service.answer_in_background)

    async def submit(self, request: InferenceRequest, webhook: Webhook | None = None) -> JobRecord:
        """Queue a job; raises the 429/503 /inference would give, before any job id exists (and any webhook)."""
        self.service.require_ready()
        self.service.require_room()
        job = await asyncio.to_thread(to_job, request, self.service.settings)
        self.service.require_memory(job)  # refused now, not after the job was accepted
        record = JobRecord(id=f"job-{uuid.uuid4().hex}", request=request, job=job, webhook=webhook)
        loop = asyncio.get_running_loop()
        # From the GPU worker thread: hand the step to the event loop, which owns the record.
        job.on_step = lambda done, total: loop.call_soon_threadsafe(record.step, done, total, time.monotonic())
        self.store.add(record)
        record.task = asyncio.create_task(self._run(record), name=record.id)
        self.service.answer_in_background(record.task)
        await asyncio.sleep(0)  # one tick: the task enqueues the job (or is refused) before anything else runs
        if record.task.done() and record.status == "failed":
            self.store.drop(record)
            status, body = record.error
            raise ServiceError(status, body["type"], body["message"], headers=self.service.retry_after)
        if webhook is not None:  # a job from here on: its events go out
            record.on_event = self.webhooks.event
        return record

    async def _run(self, record: JobRecord) -> None:
        service = self.service
        start = time.perf_counter()
        try:
            result, wait_ms = await service.submit(record.job)
            model = service.engine.describe_model()
            body = await asyncio.to_thread(
                to_response, record.request, record.job, result, wait_ms, model, service.encoder
            )
        except (asyncio.CancelledError, JobCancelled):
            record.finish("cancelled")
        except ServiceError as exc:
            record.error = (exc.status, {"type": exc.type, "message": exc.message, "request_id": current_request_id()})
            record.finish("failed")
        except Exception as exc:
            log.exception("async job %s failed", record.id)
            message = f"internal error: {type(exc).__name__}; see the server log"
            record.error = (500, {"type": "internal_error", "message": message, "request_id": current_request_id()})
            record.finish("failed")
        else:
            body["timings_ms"]["total"] = round((time.perf_counter() - start) * 1000.0, 2)
            service.metrics.observe_result(body)
            record.images = [base64.b64decode(image.pop("image")) for image in body["images"]]
            record.body = body
            record.finish("succeeded")
        self.store.finished_job(record)
        mode = "edit" if record.job.image is not None else "text_to_image"
        status = {"succeeded": 200, "cancelled": CLIENT_CLOSED}.get(record.status) or record.error[0]
        service.metrics.observe_generation(mode, status)

    def cancel(self, record: JobRecord) -> None:
        """Queued: taken out of the queue, never reaches the GPU; running: stops at its next step."""
        if record.status in FINISHED:
            raise ServiceError(409, "job_finished", f"job {record.id} has already {record.status}; nothing to cancel")
        record.finish("cancelled")
        record.task.cancel()  # the queue skips a job not started and tells a running one to stop
        self.store.finished_job(record)

    async def events(self, record: JobRecord, root: str):
        """The job's current state, then each change, then its end; leaving does not cancel the job."""
        listener: asyncio.Queue = asyncio.Queue()
        first = {"queued": "queued", "running": "progress"}.get(record.status, record.status)
        yield ServerSentEvent(data=json.dumps(record.state(root)), event=first)
        if record.status in FINISHED:
            return
        record.listeners.add(listener)
        try:
            while (item := await listener.get()) is not None:
                yield ServerSentEvent(data=item[1], event=item[0])
        finally:
            record.listeners.discard(listener)


# ----- HTTP --------------------------------------------------------------------------------------------------------
def _job_body_doc() -> dict:
    """The /inference body of the OpenAPI document, plus the job's webhook fields."""
    doc = copy.deepcopy(INFERENCE_BODY)
    fields = {
        "webhook_url": {
            "type": "string",
            "description": "POSTed the job's state (signed, Standard Webhooks) on its events; must start with a "
            "prefix the operator allows (FLUX_WEBHOOK_ALLOWED_PREFIXES; off by default: 422), e.g. "
            "https://hooks.example.com/flux.",
            "examples": [None],  # not in the example request: webhooks are off by default
        },
        "webhook_events": {
            "type": "array",
            "items": {"enum": list(WEBHOOK_EVENTS)},
            "default": ["completed"],
            "description": "start: the first denoising step; completed: succeeded, failed or cancelled. As a "
            "form field: comma-separated. Only with webhook_url.",
            "examples": [None],
        },
    }
    for kind, content in doc["requestBody"]["content"].items():
        schema = {**content["schema"], "properties": {**content["schema"]["properties"], **fields}}
        content["schema"] = form_schema(schema) if kind == "multipart/form-data" else schema
    return doc


JOB_BODY = _job_body_doc()


def _accepts(request: Request) -> str:
    return request.headers.get("accept", "").lower()


def build_router(service) -> APIRouter:
    jobs = AsyncJobs(service)
    router = APIRouter(tags=["async jobs"])

    def root(request: Request) -> str:
        return request.scope.get("root_path", "")

    @router.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobState,
        openapi_extra=JOB_BODY,
        responses={
            **ERRORS,
            200: {"description": "Prefer: wait=N and the job finished in time; or Accept: text/event-stream."},
        },
    )
    async def submit_job(
        request: Request,
        prefer: str | None = Header(
            None,
            description="RFC 7240: respond-async (the default here; also on POST /inference); wait=N: wait up to "
            "N s for the outcome before answering 202.",
        ),
    ):
        """Queue a generation (the /inference body, JSON or multipart) and answer 202 with its id and URLs at once.
        ``Accept: text/event-stream`` streams its events instead; ``Prefer: wait=N`` with ``Accept: image/png``
        (or jpeg, webp) answers the image itself when it is done within N seconds. ``webhook_url`` (and
        ``webhook_events``) have its state POSTed there, where the operator allows webhooks."""
        body, job_fields = await read_job_request(request, service.settings)  # JSON, or multipart with an image
        webhook = jobs.webhooks.parse(job_fields, root(request))
        prefs = preferences(prefer)
        wants_image = next((fmt for fmt, kind in MEDIA_TYPES.items() if kind in _accepts(request)), None)
        if wants_image and wants_image != body.output_format:
            if "output_format" in body.model_fields_set:
                raise ServiceError(
                    406, "not_acceptable", f"Accept asks for {wants_image}; output_format is {body.output_format}"
                )
            body = body.model_copy(update={"output_format": wants_image})
        record = await jobs.submit(body, webhook)
        headers = {"Location": record.urls(root(request))["get"]}
        if "respond-async" in prefs:
            headers["Preference-Applied"] = "respond-async"
        if "text/event-stream" in _accepts(request):
            return EventSourceResponse(jobs.events(record, root(request)), headers=headers)
        wait = wait_seconds(prefs, service.settings.request_timeout_s)
        if wait:
            try:
                await asyncio.wait_for(asyncio.shield(record.done.wait()), wait)
            except asyncio.TimeoutError:
                pass
            else:
                headers["Preference-Applied"] = f"wait={prefs['wait']}"
                if wants_image and record.status == "succeeded":
                    return _image_response(record, 0, headers)
                return JSONResponse(record.state(root(request)), status_code=200, headers=headers)
        return JSONResponse(record.state(root(request)), status_code=202, headers=headers)

    @router.get("/v1/jobs/{job_id}", response_model=JobState, responses=NOT_FOUND)
    async def get_job(job_id: str, request: Request):
        """The job's status: queued, running (step i of n, ETA), succeeded (result), failed (error), cancelled."""
        return JSONResponse(jobs.store.get(job_id).state(root(request)))

    @router.delete("/v1/jobs/{job_id}", response_model=JobState, responses={**NOT_FOUND, **CONFLICT})
    async def cancel_job(job_id: str, request: Request):
        """Cancel: a queued job never reaches the GPU, a running one stops at its next step; 409 once finished."""
        record = jobs.store.get(job_id)
        jobs.cancel(record)
        return JSONResponse(record.state(root(request)))

    @router.get("/v1/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **NOT_FOUND})
    async def job_events(job_id: str, request: Request):
        """Server-Sent Events: the current state (queued or progress), progress after each step, then succeeded
        (with the result), failed or cancelled, and the stream ends. Disconnecting does not cancel the job."""
        record = jobs.store.get(job_id)
        return EventSourceResponse(jobs.events(record, root(request)))

    @router.get(
        "/v1/jobs/{job_id}/image",
        response_class=Response,
        responses={200: {"content": {kind: {} for kind in MEDIA_TYPES.values()}}, **NOT_FOUND, **CONFLICT},
    )
    async def job_image(job_id: str, index: int = Query(0, ge=0, le=3, description="Which image (num_images).")):
        """A succeeded job's image as raw bytes in its format (``curl -o out.png``)."""
        record = jobs.store.get(job_id)
        if record.status != "succeeded":
            raise ServiceError(
                409, "job_not_succeeded", f"job {job_id} is {record.status}; images exist once it has succeeded"
            )
        if index >= len(record.images):
            raise ServiceError(404, "not_found", f"job {job_id} has {len(record.images)} image(s); no index {index}")
        return _image_response(record, index)

    return router


def _image_response(record: JobRecord, index: int, headers: dict | None = None) -> Response:
    fmt = record.body["images"][index]["format"]
    headers = {**(headers or {}), "Content-Disposition": f'inline; filename="{record.id}-{index}.{fmt}"'}
    return Response(record.images[index], media_type=MEDIA_TYPES[fmt], headers=headers)
