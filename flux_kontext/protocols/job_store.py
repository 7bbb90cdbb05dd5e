"""The async jobs' records and their bounded in-memory store (async_jobs.py serves them over HTTP). No torch here."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from flux_kontext.errors import ServiceError
from flux_kontext.jobs import Job
from flux_kontext.schemas import InferenceRequest

FINISHED = ("succeeded", "failed", "cancelled")
WEBHOOK_EVENTS = ("start", "completed")  # start: the first denoising step; completed: succeeded, failed or cancelled


@dataclass
class Delivery:
    """One webhook event's delivery: attempts so far, the receiver's last status or the last error."""

    delivered: bool = False
    pending: bool = True  # still being sent (or waiting to retry)
    attempts: int = 0
    status_code: int | None = None
    error: str | None = None


@dataclass
class Webhook:
    """A job's webhook: where, for which events, and how each delivery went (async_jobs.Webhooks sends them)."""

    url: str
    events: tuple[str, ...] = ("completed",)
    root: str = ""  # the submission's root_path, for the URLs in the payload
    deliveries: dict[str, Delivery] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one delivery at a time: start before completed

    def state(self, deliveries: bool = True) -> dict:
        out: dict = {"url": self.url, "events": list(self.events)}
        if deliveries:
            out["deliveries"] = {event: asdict(delivery) for event, delivery in self.deliveries.items()}
        return out


@dataclass
class JobRecord:
    id: str
    request: InferenceRequest
    job: Job
    created_at: float = field(default_factory=time.time)
    status: str = "queued"
    first_step_at: float | None = None
    last_step_at: float | None = None
    finished_at: float | None = None
    body: dict | None = None  # succeeded: the /inference body, its images' base64 kept in ``images`` instead
    images: list[bytes] = field(default_factory=list)
    error: tuple[int, dict] | None = None  # failed: (the status /inference would have answered, the error body)
    task: asyncio.Task | None = None
    listeners: set[asyncio.Queue] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    webhook: Webhook | None = None
    on_event: Callable[[JobRecord, str], None] | None = None  # "start" (first step), "completed" (finished)

    @property
    def kept_bytes(self) -> int:
        return sum(len(image) for image in self.images)

    def urls(self, root: str = "") -> dict[str, str]:
        base = f"{root}/v1/jobs/{self.id}"
        return {"get": base, "cancel": base, "events": f"{base}/events", "image": f"{base}/image?index=0"}

    def state(self, root: str = "", deliveries: bool = True) -> dict:
        """What GET /v1/jobs/{id} answers, the data of every event and the body of a webhook (without its
        deliveries: ``deliveries=False``)."""
        out = {"id": self.id, "status": self.status, "created_at": round(self.created_at, 3), "urls": self.urls(root)}
        if self.job.progress is not None and self.status in ("running", "cancelled"):
            step, steps = self.job.progress
            out["progress"] = {"step": step, "steps": steps}
            if self.status == "running":
                out["eta_s"] = self.eta_s()
        if self.status == "succeeded":
            result = dict(self.body)
            result["images"] = [
                {**meta, "image": base64.b64encode(data).decode()}
                for meta, data in zip(self.body["images"], self.images, strict=True)
            ]
            out["result"] = result
        elif self.status == "failed":
            out["status_code"], out["error"] = self.error
        if self.webhook is not None:
            out["webhook"] = self.webhook.state(deliveries)
        return out

    def eta_s(self) -> float | None:
        """Remaining denoising steps at the mean step time so far (decoding not included); None before 2 steps."""
        step, steps = self.job.progress
        if step < 2 or self.first_step_at is None:
            return None
        per_step = (self.last_step_at - self.first_step_at) / (step - 1)
        return round(per_step * (steps - step), 2)

    # called on the event loop
    def step(self, done: int, total: int, at: float) -> None:
        if self.status in FINISHED:
            return
        started, self.status = self.status == "queued", "running"
        self.first_step_at = self.first_step_at or at
        self.last_step_at = at
        self.publish("progress")
        if started and self.on_event is not None:
            self.on_event(self, "start")

    def finish(self, status: str) -> None:
        if self.status in FINISHED:
            return
        self.status, self.finished_at = status, time.monotonic()
        self.publish(status)
        for listener in self.listeners:
            listener.put_nowait(None)
        self.done.set()
        if self.on_event is not None:
            self.on_event(self, "completed")

    def publish(self, event: str) -> None:
        if self.listeners:
            data = json.dumps(self.state())
            for listener in self.listeners:
                listener.put_nowait((event, data))


class JobStore:
    """Jobs by id. Finished ones are evicted oldest first past the TTL, the count or the byte budget."""

    def __init__(self, ttl_s: float, max_kept: int, max_bytes: int):
        self.ttl_s, self.max_kept, self.max_bytes = ttl_s, max_kept, max_bytes
        self.jobs: dict[str, JobRecord] = {}
        self.finished: OrderedDict[str, JobRecord] = OrderedDict()  # in the order they finished
        self.finished_bytes = 0

    def add(self, record: JobRecord) -> None:
        self.prune()
        self.jobs[record.id] = record

    def drop(self, record: JobRecord) -> None:
        self.jobs.pop(record.id, None)

    def get(self, job_id: str) -> JobRecord:
        self.prune()
        record = self.jobs.get(job_id)
        if record is None:
            raise ServiceError(
                404,
                "not_found",
                f"no job {job_id!r}: unknown, or finished and no longer kept (finished jobs are kept "
                f"{self.ttl_s:g} s, at most {self.max_kept} of them, in memory: a restart loses them)",
            )
        return record

    def finished_job(self, record: JobRecord) -> None:
        if record.id in self.jobs and record.id not in self.finished:
            self.finished[record.id] = record
            self.finished_bytes += record.kept_bytes
        self.prune()

    def prune(self) -> None:
        now = time.monotonic()
        while self.finished:
            oldest = next(iter(self.finished.values()))
            expired = now - oldest.finished_at > self.ttl_s
            if not (expired or len(self.finished) > self.max_kept or self.finished_bytes > self.max_bytes):
                return
            self.finished.popitem(last=False)
            self.finished_bytes -= oldest.kept_bytes
            self.jobs.pop(oldest.id, None)
