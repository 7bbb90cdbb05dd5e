"""Webhooks of async jobs, and the job's own request fields (``webhook_url``, ``webhook_events``) read apart from the
/inference fields. Off unless the operator lists the URL prefixes a job may name (FLUX_WEBHOOK_ALLOWED_PREFIXES); each
event is POSTed from the event loop, signed the Standard Webhooks way with FLUX_WEBHOOK_SECRET (why and how:
async_jobs.py's docstring and the README). No torch here."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from flux_kontext.protocols.job_store import WEBHOOK_EVENTS, Delivery, JobRecord, Webhook
from flux_kontext.request_forms import FormBody, read_form, read_inference_request
from flux_kontext.schemas import InferenceRequest

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


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

    def __init__(self, settings, track: Callable[[asyncio.Task], None]):
        # Each delivery's task goes to ``track`` (the Service's drain waits for it), which holds it while it runs: the
        # loop keeps only weak references.
        self.track = track
        self.prefixes = list(settings.webhook_allowed_prefixes)
        self.key = settings.webhook_key if self.prefixes else b""
        self.timeout_s, self.retries = settings.webhook_timeout_s, settings.webhook_retries

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
        import httpx  # only once a job names a webhook (not before ready: BENCHMARKS.md, "Import time")

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
        self.track(task)

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
        import httpx

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
