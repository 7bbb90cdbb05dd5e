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
import hashlib
import hmac
import json
import logging
import time
import uuid

import httpx
from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from flux_kontext.errors import ServiceError
from flux_kontext.jobs import JobCancelled
from flux_kontext.protocols.job_store import FINISHED, WEBHOOK_EVENTS, Delivery, JobRecord, JobStore, Webhook
from flux_kontext.request_forms import INFERENCE_BODY, FormBody, read_form, read_inference_request
from flux_kontext.schemas import ErrorBody, ErrorEnvelope, InferenceRequest, InferenceResponse
from flux_kontext.service import ERRORS, to_job, to_response

log = logging.getLogger(__name__)
NOT_FOUND = {404: {"model": ErrorEnvelope}}
CONFLICT = {409: {"model": ErrorEnvelope}}
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


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
                scope = {**scope, "path": "/v1/jobs", "raw_path": b"/v1/jobs"}
        return await self.app(scope, receive, send)


# ----- the job's own fields: webhook_url, webhook_events ---------------------------------------------------------
WEBHOOK_FIELDS = ("webhook_url", "webhook_events")
FORM_KINDS = ("multipart/form-data", "application/x-www-form-urlencoded")


def field_error(name: str, kind: str, message: str) -> RequestValidationError:
    """A 422 in the envelope naming the field, as for the /inference fields."""
    return RequestValidationError([{"loc": ("body", name), "msg": message, "type": kind}])


def _replayed(request: Request, body: bytes, content_type: str | None = None) -> Request:
    """A Request over ``body`` instead of the one received (same scope otherwise)."""
    headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-length", b"content-type")]
    kind = content_type or request.headers.get("content-type")
    headers += [(b"content-length", str(len(body)).encode())] + ([(b"content-type", kind.encode())] if kind else [])
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()  # then the connection's own (its disconnect)

    return Request({**request.scope, "headers": headers}, receive)


def _multipart(form: FormBody) -> tuple[bytes, str]:
    """A form encoded again as multipart/form-data (names escaped as browsers do)."""
    boundary = f"flux-{uuid.uuid4().hex}"

    def part(name: str, data: bytes, is_file: bool) -> bytes:
        name = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
        disposition = f'form-data; name="{name}"' + (f'; filename="{name}"' if is_file else "")
        kind = "Content-Type: application/octet-stream\r\n" if is_file else ""
        return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + data + b"\r\n"

    parts = [part(name, value.encode(), False) for name, value in form.fields.items()]
    parts += [part(name, data, True) for name, files in form.files.items() for data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def read_job_request(request: Request, settings) -> tuple[InferenceRequest, dict]:
    """The /inference body (JSON or a form) and, taken out of it first, the job's own fields (webhook_url,
    webhook_events), so that InferenceRequest keeps refusing every field it does not know."""
    raw = await request.body()
    if b"webhook" not in raw:  # nothing to take out (the common case): read as /inference does
        return await read_inference_request(request, settings), {}
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    taken: dict = {}
    if kind in FORM_KINDS and not raw.lstrip().startswith(b"{"):
        form = await read_form(request, settings.max_body_bytes)
        taken = {name: form.fields.pop(name) for name in WEBHOOK_FIELDS if name in form.fields}
        # read once (and its files closed): read_inference_request gets a fresh Request either way
        request = _replayed(request, *_multipart(form)) if taken else _replayed(request, raw)
    elif not kind or kind == "application/json" or kind.endswith("+json"):
        try:
            data = json.loads(raw)
        except ValueError:
            data = None  # read_inference_request says what is wrong with it
        if isinstance(data, dict) and any(name in data for name in WEBHOOK_FIELDS):
            taken = {name: data.pop(name) for name in WEBHOOK_FIELDS if name in data}
            request = _replayed(request, json.dumps(data).encode())
    return await read_inference_request(request, settings), taken


# ----- webhooks ------------------------------------------------------------------------------------------------------
class Webhooks:
    """Checks a job's webhook fields against the operator's prefixes, then sends its events, signed (Standard
    Webhooks: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of
    id.timestamp.body>``), from the event loop, with retries; the outcome goes into the job's ``webhook`` state."""

    backoff_s = 0.5  # before the 2nd attempt; doubles after each, at most max_backoff_s
    max_backoff_s = 8.0
    max_url_length = 2048

    def __init__(self, settings):
        self.prefixes = list(settings.webhook_allowed_prefixes)
        self.key = settings.webhook_key if self.prefixes else b""
        self.timeout_s, self.retries = settings.webhook_timeout_s, settings.webhook_retries
        self.tasks: set[asyncio.Task] = set()  # deliveries in flight (held: the loop keeps only weak references)

    def parse(self, fields: dict, root: str) -> Webhook | None:
        """webhook_url and webhook_events as sent (JSON values or form text), or a 422 naming the field."""
        url, events = fields.get("webhook_url"), fields.get("webhook_events")
        if url is None:
            if events is not None:
                raise field_error("webhook_events", "webhook_url_missing", "given without a webhook_url")
            return None
        if not self.prefixes:
            raise field_error(
                "webhook_url",
                "webhooks_disabled",
                "webhooks are off: the operator has not enabled them (FLUX_WEBHOOK_ALLOWED_PREFIXES is empty)",
            )
        return Webhook(url=self._check_url(url), events=self._check_events(events), root=root)

    def _check_url(self, url) -> str:
        def refuse(why: str):
            return field_error("webhook_url", "webhook_url_not_allowed", why)

        if not isinstance(url, str):
            raise refuse("must be a string (an http(s) URL)")
        if len(url) > self.max_url_length or not url.isprintable() or " " in url:
            raise refuse(f"must be an http(s) URL of at most {self.max_url_length} printable characters, no spaces")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise refuse(f"is not a valid URL ({exc})") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise refuse("must be an http(s) URL")
        segments = parsed.path.split("/")
        if "." in segments or ".." in segments or "\\" in parsed.path or b"%2f" in parsed.raw_path.lower():
            raise refuse("must not have '.' or '..' path segments, backslashes or encoded slashes")
        for prefix in self.prefixes:
            allowed = httpx.URL(prefix)
            same_origin = (parsed.scheme, parsed.host, parsed.port) == (allowed.scheme, allowed.host, allowed.port)
            if same_origin and not parsed.userinfo and str(parsed).startswith(str(allowed)):
                return str(parsed)
        raise refuse(f"{url!r} does not start with a prefix the operator allows: {', '.join(self.prefixes)}")

    @staticmethod
    def _check_events(events) -> tuple[str, ...]:
        if events is None:
            return ("completed",)
        if isinstance(events, str):  # a form field: start,completed (or the JSON list as text)
            text = events.strip()
            try:
                events = json.loads(text) if text.startswith("[") else [e.strip() for e in text.split(",") if e.strip()]
            except ValueError:
                events = None
        if not isinstance(events, list) or not events or any(e not in WEBHOOK_EVENTS for e in events):
            raise field_error(
                "webhook_events",
                "webhook_events_invalid",
                f"must be a non-empty list of {', '.join(WEBHOOK_EVENTS)} (a form field: comma-separated)",
            )
        return tuple(e for e in WEBHOOK_EVENTS if e in events)

    # on the event loop, from JobRecord.step / finish
    def event(self, record: JobRecord, event: str) -> None:
        hook = record.webhook
        if hook is None or event not in hook.events or event in hook.deliveries:
            return
        delivery = hook.deliveries[event] = Delivery()
        snapshot = record.state(hook.root, deliveries=False) if event == "start" else None  # it changes on
        task = asyncio.create_task(self._deliver(record, event, delivery, snapshot), name=f"{record.id}-{event}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, record: JobRecord, event: str, delivery: Delivery, snapshot: dict | None) -> None:
        hook = record.webhook
        try:
            if snapshot is None:  # finished: the state no longer changes; encoding its images is work for a thread
                body = await asyncio.to_thread(lambda: json.dumps(record.state(hook.root, deliveries=False)).encode())
            else:
                body = json.dumps(snapshot).encode()
            async with hook.lock:  # "start" is out (or given up) before "completed" goes
                await self._send(hook.url, f"{record.id}_{event}", body, delivery)
        except Exception as exc:  # never the job's failure
            log.exception("webhook %s of %s", event, record.id)
            delivery.error = f"{type(exc).__name__}: {exc}"
        finally:
            delivery.pending = False
        if not delivery.delivered:
            log.warning(
                "webhook %s of %s not delivered after %d attempt(s): %s",
                event,
                record.id,
                delivery.attempts,
                delivery.error,
            )

    def sign(self, message_id: str, timestamp: str, body: bytes) -> str:
        digest = hmac.new(self.key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode()

    async def _send(self, url: str, message_id: str, body: bytes, delivery: Delivery) -> None:
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s) as client:
            for attempt in range(1, self.retries + 2):
                if attempt > 1:
                    await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 2), self.max_backoff_s))
                delivery.attempts = attempt
                timestamp = str(int(time.time()))
                headers = {
                    "content-type": "application/json",
                    "user-agent": "flux-kontext-webhooks",
                    "webhook-id": message_id,  # the same on every attempt: receivers drop repeats by it
                    "webhook-timestamp": timestamp,
                    "webhook-signature": self.sign(message_id, timestamp, body),
                }
                try:
                    status = await asyncio.wait_for(self._post(client, url, body, headers), self.timeout_s)
                except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
                    delivery.status_code = None
                    delivery.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    continue
                delivery.status_code = status
                if 200 <= status < 300:
                    delivery.delivered, delivery.error = True, None
                    return
                delivery.error = f"the receiver answered {status}"
                if 300 <= status < 400:
                    delivery.error += " (redirects are not followed)"
                if status < 500 and status != 429:
                    return  # the receiver's refusal: trying again would not change it

    @staticmethod
    async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict) -> int:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            return response.status_code  # its body is never read


# ----- the runner ------------------------------------------------------------------------------------------------
class AsyncJobs:
    """Admits jobs into the Service's queue and runs each as its own task, detached from any HTTP connection."""

    def __init__(self, service):
        self.service = service
        s = service.settings
        self.store = JobStore(s.job_result_ttl_s, s.max_kept_jobs, int(s.max_kept_job_mb * 2**20))
        self.webhooks = Webhooks(s)

    async def submit(self, request: InferenceRequest, webhook: Webhook | None = None) -> JobRecord:
        """Queue a job; raises the 429/503 /inference would give, before any job id exists (and any webhook)."""
        self.service.require_ready()
        self.service.require_room()
        job = await asyncio.to_thread(to_job, request, self.service.settings)
        record = JobRecord(id=f"job-{uuid.uuid4().hex}", request=request, job=job, webhook=webhook)
        loop = asyncio.get_running_loop()
        # From the GPU worker thread: hand the step to the event loop, which owns the record.
        job.on_step = lambda done, total: loop.call_soon_threadsafe(record.step, done, total, time.monotonic())
        self.store.add(record)
        record.task = asyncio.create_task(self._run(record), name=record.id)
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
            body = await asyncio.to_thread(to_response, record.request, record.job, result, wait_ms, model)
        except (asyncio.CancelledError, JobCancelled):
            record.finish("cancelled")
        except ServiceError as exc:
            record.error = (exc.status, {"type": exc.type, "message": exc.message})
            record.finish("failed")
        except Exception as exc:
            log.exception("async job %s failed", record.id)
            message = f"internal error: {type(exc).__name__}; see the server log"
            record.error = (500, {"type": "internal_error", "message": message})
            record.finish("failed")
        else:
            body["timings_ms"]["total"] = round((time.perf_counter() - start) * 1000.0, 2)
            service.metrics.observe_timings(body["timings_ms"])
            service.metrics.images.inc(len(body["images"]))
            record.images = [base64.b64decode(image.pop("image")) for image in body["images"]]
            record.body = body
            record.finish("succeeded")
        self.store.finished_job(record)

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
class JobUrls(BaseModel):
    get: str = Field(..., examples=["/v1/jobs/job-0123abcd"])
    cancel: str = Field(..., description="DELETE this URL to cancel.")
    events: str = Field(..., description="Server-Sent Events: queued, progress (each step), then the outcome.")
    image: str = Field(..., description="The first image as raw bytes once succeeded (?index=i for the others).")


class JobProgress(BaseModel):
    step: int = Field(..., description="Denoising steps done.")
    steps: int = Field(..., description="Denoising steps in all.")


class JobWebhookDelivery(BaseModel):
    delivered: bool = Field(..., description="The receiver answered 2xx.")
    pending: bool = Field(..., description="Still being sent, or waiting to retry.")
    attempts: int
    status_code: int | None = Field(None, description="The receiver's last status; none after a network error.")
    error: str | None = Field(None, description="Why the last attempt did not deliver.")


class JobWebhook(BaseModel):
    url: str
    events: list[str] = Field(..., examples=[["completed"]])
    deliveries: dict[str, JobWebhookDelivery] | None = Field(
        None, description="By event (start, completed), once it has happened; not in the webhook's own body."
    )


class JobState(BaseModel):
    id: str
    status: str = Field(..., description="queued | running | succeeded | failed | cancelled")
    created_at: float = Field(..., description="Unix time of the submission.")
    urls: JobUrls
    progress: JobProgress | None = Field(None, description="running (and cancelled while running).")
    eta_s: float | None = Field(None, description="running: remaining steps at the step rate so far.")
    result: InferenceResponse | None = Field(None, description="succeeded: what POST /inference returns.")
    status_code: int | None = Field(None, description="failed: the status /inference would have answered.")
    error: ErrorBody | None = Field(None, description="failed: the error envelope's body.")
    webhook: JobWebhook | None = Field(None, description="Where the job's webhook goes and how its deliveries went.")


def _job_body_doc() -> dict:
    """The /inference body of the OpenAPI document, plus the job's webhook fields."""
    doc = copy.deepcopy(INFERENCE_BODY)
    fields = {
        "webhook_url": {
            "type": "string",
            "description": "POSTed the job's state (signed, Standard Webhooks) on its events; must start with a "
            "prefix the operator allows (FLUX_WEBHOOK_ALLOWED_PREFIXES; off by default: 422).",
            "examples": ["https://hooks.example.com/flux"],
        },
        "webhook_events": {
            "type": "array",
            "items": {"enum": list(WEBHOOK_EVENTS)},
            "default": ["completed"],
            "description": "start: the first denoising step; completed: succeeded, failed or cancelled. As a "
            "form field: comma-separated.",
        },
    }
    for content in doc["requestBody"]["content"].values():
        content["schema"]["properties"] = {**content["schema"]["properties"], **fields}
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
        wants_image = next((fmt for fmt, kind in IMAGE_TYPES.items() if kind in _accepts(request)), None)
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
        responses={200: {"content": {kind: {} for kind in IMAGE_TYPES.values()}}, **NOT_FOUND, **CONFLICT},
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
    return Response(record.images[index], media_type=IMAGE_TYPES[fmt], headers=headers)
